"""Renders one cluttered-digit canvas in pure NumPy: the generator of `cluttered_digits`.

What: `render_example(source_image, rng, image_size, clutter_sources)` draws an
8x8 `load_digits` digit at a random scale, position and colour on an S x S RGB
canvas with clutter fragments cut from other digits, and returns
(image uint8 [S, S, 3], bbox float32 [4], ink_mask bool [S, S]).
Why pure NumPy, element-wise only: the dataset's bytes must not depend on the
machine (no BLAS). How an example is drawn: cgc_tf/data/cluttered_digits/README.md.
"""

import functools

import numpy as np

MIN_IMAGE_SIZE = 16
"""Smallest accepted canvas side; below it digits and clutter become specks."""

# `load_digits()` pixels count the set pixels of 4x4 blocks, hence 0..16.
SOURCE_MAX_VALUE = 16.0
SOURCE_SIDE = 8

MIN_DIGIT_FRACTION = 0.4
MAX_DIGIT_FRACTION = 0.7
INK_THRESHOLD = 0.5
MIN_LUMA_CONTRAST = 96.0
MIN_FRAGMENT_SOURCE_PIXELS = 3
MAX_FRAGMENT_SOURCE_PIXELS = 4
# Crops are redrawn until their mean ink is in this range: emptier crops are
# faint specks, fuller ones solid blocks; in between they look like strokes.
MIN_FRAGMENT_MEAN_INTENSITY = 0.25
MAX_FRAGMENT_MEAN_INTENSITY = 0.6
FRAGMENT_CROP_ATTEMPTS = 8
# Fragments are drawn at this fraction of the main digit's pixels per source
# pixel. At 1.0 they were as bold as the digit and cost a plain CNN about 5
# points of test accuracy after 10 epochs; at 0.7 they are still clearly
# strokes but read as small pieces.
FRAGMENT_SCALE = 0.7
MAX_FRAGMENT_OVERLAP = 0.1
# The keep-out box is the ink box grown by this many source pixels (scaled), so
# that accepted fragments also rarely touch the digit.
KEEP_OUT_MARGIN_SOURCE_PIXELS = 0.5
FRAGMENT_PLACEMENT_ATTEMPTS = 20
COLOUR_ATTEMPTS = 64


def validate_image_size(image_size):
    """Checks that `image_size` is a usable canvas side.

    Args:
      image_size: canvas side in pixels.

    Returns:
      `image_size` as a Python int.

    Raises:
      ValueError: if `image_size` is not an integer >= `MIN_IMAGE_SIZE`.
    """
    # bool is an int subclass, but image_size=True is certainly a mistake.
    is_integer = isinstance(image_size, (int, np.integer)) and not isinstance(
        image_size, (bool, np.bool_)
    )
    if not is_integer or image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got "
            f"{image_size!r} ({type(image_size).__name__})"
        )
    return int(image_size)


@functools.lru_cache(maxsize=512)
def _sample_grid(output_size, input_size):
    """Bilinear taps along one axis: (lower, upper) int64 [output_size] indices
    and their float64 [output_size, 1] weights (lower_weight, upper_weight).

    Half-pixel centres with edge clamping, like tf.image.resize("bilinear").
    Cached because only a few dozen (output, input) pairs ever occur.
    """
    positions = (np.arange(output_size) + 0.5) * input_size / output_size - 0.5
    positions = np.clip(positions, 0.0, input_size - 1)
    lower = np.floor(positions).astype(np.int64)
    upper = np.minimum(lower + 1, input_size - 1)
    upper_weight = (positions - lower)[:, None]
    return lower, upper, 1.0 - upper_weight, upper_weight


def _bilinear_resize(image, height, width):
    """Bilinear resize in NumPy: float64 [h, w] -> float64 [height, width].

    Element-wise products and sums only (no BLAS matmul, whose rounding can
    depend on the CPU), so the bytes of the dataset do not depend on the
    machine. Outputs are convex combinations of inputs: [0, 1] stays [0, 1].
    """
    lower, upper, lower_weight, upper_weight = _sample_grid(height, image.shape[0])
    rows = image[lower] * lower_weight + image[upper] * upper_weight
    lower, upper, lower_weight, upper_weight = _sample_grid(width, image.shape[1])
    return rows[:, lower] * lower_weight.T + rows[:, upper] * upper_weight.T


def _luma(colours):
    """BT.601 luma of float64 [..., 3] RGB colours -> float64 [...] (0..255)."""
    # Written out rather than a matmul, for the same reason as in _bilinear_resize.
    return 0.299 * colours[..., 0] + 0.587 * colours[..., 1] + 0.114 * colours[..., 2]


def _contrasting_colours(candidates, background):
    """Picks, per row, the first candidate colour that stands out from the background.

    Drawing a whole block of candidates at once replaces a rejection loop: a
    single uniform colour passes the contrast test only ~20% of the time.

    Args:
      candidates: int or float [N, A, 3], RGB in 0..255 (A = COLOUR_ATTEMPTS).
      background: float64 [3], RGB in 0..255.

    Returns:
      float64 [N, 3]: per row, the first candidate whose luma is at least
      MIN_LUMA_CONTRAST away from the background's (black or white, whichever
      qualifies, in the practically impossible case that none does).
    """
    candidates = np.asarray(candidates, dtype=np.float64)
    background_luma = float(_luma(background))
    acceptable = np.abs(_luma(candidates) - background_luma) >= MIN_LUMA_CONTRAST
    colours = candidates[np.arange(len(candidates)), np.argmax(acceptable, axis=1)]
    colours[~acceptable.any(axis=1)] = 0.0 if background_luma >= 127.5 else 255.0
    return colours


def _composite(canvas, alpha, colour, top, left):
    """Paints `colour` with opacity `alpha` [h, w] onto canvas[top:top+h, left:left+w]."""
    height, width = alpha.shape
    window = canvas[top : top + height, left : left + width]
    window += alpha[..., None] * (colour - window)


def _tight_box(mask):
    """(top, left, bottom, right) pixel edges of bool [h, w] `mask`, or None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(columns[0]), int(rows[-1]) + 1, int(columns[-1]) + 1


def _choose_crops(intensities, crop_sides, corners):
    """Cuts one crop with a stroke-like amount of ink from each clutter digit.

    Args:
      intensities: float64 [K, 8, 8], ink intensity in [0, 1].
      crop_sides: int [K], crop side c in source pixels (3 or 4).
      corners: int [K, A, 2], candidate (top, left) corners per digit, each
        valid for its crop side (A = FRAGMENT_CROP_ATTEMPTS).

    Returns:
      A list of K float64 [c + 2, c + 2] crops, each with a zero border: per
      digit, the first candidate whose mean intensity is in
      [MIN_FRAGMENT_MEAN_INTENSITY, MAX_FRAGMENT_MEAN_INTENSITY], or else the
      one closest to the middle of that range.
    """
    tables = np.zeros((len(intensities), SOURCE_SIDE + 1, SOURCE_SIDE + 1))
    tables[:, 1:, 1:] = intensities.cumsum(axis=1).cumsum(axis=2)
    digit = np.arange(len(intensities))[:, None]
    tops, lefts = corners[..., 0], corners[..., 1]
    bottoms, rights = tops + crop_sides[:, None], lefts + crop_sides[:, None]
    sums = (
        tables[digit, bottoms, rights]
        - tables[digit, tops, rights]
        - tables[digit, bottoms, lefts]
        + tables[digit, tops, lefts]
    )
    inks = sums / (crop_sides * crop_sides)[:, None]
    acceptable = (inks >= MIN_FRAGMENT_MEAN_INTENSITY) & (inks <= MAX_FRAGMENT_MEAN_INTENSITY)
    middle = 0.5 * (MIN_FRAGMENT_MEAN_INTENSITY + MAX_FRAGMENT_MEAN_INTENSITY)
    chosen = np.where(
        acceptable.any(axis=1),
        np.argmax(acceptable, axis=1),
        np.argmin(np.abs(inks - middle), axis=1),
    )
    crops = []
    for index, (side, attempt) in enumerate(zip(crop_sides.tolist(), chosen.tolist())):
        top, left = corners[index, attempt].tolist()
        # The blank one-pixel border lets the cut edges fade out like the
        # digit's own edges; hard square edges would give clutter away.
        crop = np.zeros((side + 2, side + 2))
        crop[1:-1, 1:-1] = intensities[index, top : top + side, left : left + side]
        crops.append(crop)
    return crops


def _summed_area_table(values):
    """float64 [h + 1, w + 1] with table[i, j] = values[:i, :j].sum() (O(1) box sums)."""
    table = np.zeros((values.shape[0] + 1, values.shape[1] + 1))
    table[1:, 1:] = values.cumsum(axis=0).cumsum(axis=1)
    return table


def _rectangle_sums(table, row_start, column_start, row_stop, column_stop):
    """Sums of values[row_start:row_stop, column_start:column_stop], vectorised."""
    return (
        table[row_stop, column_stop]
        - table[row_start, column_stop]
        - table[row_stop, column_start]
        + table[row_start, column_start]
    )


def _place_fragment(fragment_ink, corners, box):
    """Picks the top-left corner of a fragment so it mostly avoids `box`.

    Args:
      fragment_ink: bool [f, f], the fragment's ink pixels.
      corners: int [A, 2], candidate (top, left) corners on the canvas
        (A = FRAGMENT_PLACEMENT_ATTEMPTS).
      box: (top, left, bottom, right) pixel edges of the keep-out box.

    Returns:
      (top, left) ints: the first candidate that puts at most
      MAX_FRAGMENT_OVERLAP of the fragment's ink inside `box`, or the least
      overlapping one if none does.
    """
    side = fragment_ink.shape[0]
    table = _summed_area_table(fragment_ink)
    # The box in each candidate fragment's own coordinates, cut to the fragment
    # (np.minimum/np.maximum: np.clip's Python wrapper costs more than the math).
    edges = np.minimum(np.maximum(np.asarray(box) - corners[:, [0, 1, 0, 1]], 0), side)
    inside = _rectangle_sums(table, edges[:, 0], edges[:, 1], edges[:, 2], edges[:, 3])
    overlap = inside / max(1.0, table[-1, -1])
    acceptable = overlap <= MAX_FRAGMENT_OVERLAP
    chosen = int(np.argmax(acceptable)) if acceptable.any() else int(np.argmin(overlap))
    return int(corners[chosen, 0]), int(corners[chosen, 1])


def _intensity(source_image):
    """float [..., 8, 8] load_digits values -> float64 [..., 8, 8] ink intensity in [0, 1]."""
    return np.minimum(np.maximum(source_image / SOURCE_MAX_VALUE, 0.0), 1.0)


def render_example(source_image, rng, image_size, clutter_sources):
    """Renders one cluttered-digit canvas in pure NumPy (the dataset's generator).

    Args:
      source_image: float [8, 8], the main digit with values in [0, 16] (as in
        `load_digits().images`).
      rng: numpy Generator supplying all randomness; the result depends only on
        its state and the other arguments.
      image_size: int >= 16, the canvas side S.
      clutter_sources: float [K, 8, 8] (or a sequence of K [8, 8] arrays),
        values in [0, 16]; one fragment is cut from each, so K (which may be 0)
        is the number of clutter fragments.

    Returns:
      (image, bbox, ink_mask):
        image: uint8 [S, S, 3], the RGB canvas.
        bbox: float32 [4], normalised [ymin, xmin, ymax, xmax] of the tight box
          (pixel edges) around `ink_mask`, inside [0, 1].
        ink_mask: bool [S, S], True where the main digit's bilinear intensity is
          >= INK_THRESHOLD. These pixels are at least half foreground colour and
          are never covered by clutter.

    Raises:
      ValueError: if `image_size` is not an integer >= 16, or `source_image` /
        `clutter_sources` have the wrong shape.
    """
    image_size = validate_image_size(image_size)
    source_image = np.asarray(source_image, dtype=np.float64)
    if source_image.shape != (SOURCE_SIDE, SOURCE_SIDE):
        raise ValueError(
            f"source_image must have shape ({SOURCE_SIDE}, {SOURCE_SIDE}), got {source_image.shape}"
        )
    clutter_sources = np.asarray(clutter_sources, dtype=np.float64)
    if clutter_sources.size == 0:
        clutter_sources = np.zeros((0, SOURCE_SIDE, SOURCE_SIDE))
    if clutter_sources.ndim != 3 or clutter_sources.shape[1:] != (SOURCE_SIDE, SOURCE_SIDE):
        raise ValueError(
            f"clutter_sources must have shape (K, {SOURCE_SIDE}, {SOURCE_SIDE}), got "
            f"{clutter_sources.shape}"
        )

    # Every random draw of the main digit comes before those of the clutter,
    # so a render without clutter shows the very same digit (tests rely on it).
    background = rng.integers(0, 256, size=3).astype(np.float64)
    foreground = _contrasting_colours(
        rng.integers(0, 256, size=(1, COLOUR_ATTEMPTS, 3)), background
    )[0]
    digit_side = int(round(rng.uniform(MIN_DIGIT_FRACTION, MAX_DIGIT_FRACTION) * image_size))
    digit_top, digit_left = (int(v) for v in rng.integers(0, image_size - digit_side + 1, size=2))
    digit_alpha = _bilinear_resize(_intensity(source_image), digit_side, digit_side)
    ink_mask = np.zeros((image_size, image_size), dtype=bool)
    ink_mask[digit_top : digit_top + digit_side, digit_left : digit_left + digit_side] = (
        digit_alpha >= INK_THRESHOLD
    )
    ink_box = _tight_box(ink_mask)
    if ink_box is None:
        # Only a blank source digit gets here; the placed square is the best box.
        ink_box = (digit_top, digit_left, digit_top + digit_side, digit_left + digit_side)

    canvas = np.empty((image_size, image_size, 3), dtype=np.float64)
    canvas[...] = background
    fragment_count = len(clutter_sources)
    if fragment_count:
        pixels_per_source_pixel = digit_side / SOURCE_SIDE
        margin = max(1, round(KEEP_OUT_MARGIN_SOURCE_PIXELS * pixels_per_source_pixel))
        keep_out = (
            max(0, ink_box[0] - margin),
            max(0, ink_box[1] - margin),
            min(image_size, ink_box[2] + margin),
            min(image_size, ink_box[3] + margin),
        )
        crop_sides = rng.integers(
            MIN_FRAGMENT_SOURCE_PIXELS, MAX_FRAGMENT_SOURCE_PIXELS + 1, size=fragment_count
        )
        crop_corners = rng.integers(
            0,
            (SOURCE_SIDE - crop_sides + 1)[:, None, None],
            size=(fragment_count, FRAGMENT_CROP_ATTEMPTS, 2),
        )
        crops = _choose_crops(_intensity(clutter_sources), crop_sides, crop_corners)
        fragment_scale = pixels_per_source_pixel * FRAGMENT_SCALE
        fragment_sides = np.array(
            [min(image_size, max(1, round(crop.shape[0] * fragment_scale))) for crop in crops]
        )
        placement_corners = rng.integers(
            0,
            (image_size - fragment_sides + 1)[:, None, None],
            size=(fragment_count, FRAGMENT_PLACEMENT_ATTEMPTS, 2),
        )
        fragment_colours = _contrasting_colours(
            rng.integers(0, 256, size=(fragment_count, COLOUR_ATTEMPTS, 3)), background
        )
        for crop, side, corners, colour in zip(
            crops, fragment_sides.tolist(), placement_corners, fragment_colours
        ):
            fragment_alpha = _bilinear_resize(crop, side, side)
            top, left = _place_fragment(fragment_alpha >= INK_THRESHOLD, corners, keep_out)
            _composite(canvas, fragment_alpha, colour, top, left)

    # Painted last so that clutter never hides the main digit's ink.
    _composite(canvas, digit_alpha, foreground, digit_top, digit_left)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    bbox = np.asarray(ink_box, dtype=np.float32) / np.float32(image_size)
    return image, bbox, ink_mask
