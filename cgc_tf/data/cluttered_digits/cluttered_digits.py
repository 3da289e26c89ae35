"""The `cluttered_digits` dataset: real handwritten digits on cluttered canvases.

This is the embedded default dataset of `cgc_tf`. It needs no download: it is
rendered from the 1,797 real handwritten 8x8 digits that scikit-learn ships with
`sklearn.datasets.load_digits()` (a copy of the test set of the UCI "Optical
Recognition of Handwritten Digits" data; pixel values 0..16).

Every example is an RGB uint8 canvas of S x S pixels (S = `image_size` of the
builder config) that contains:

* one main digit, upscaled bilinearly from 8x8 to a square of side
  round(u * S) pixels with u ~ Uniform(0.4, 0.7), at a uniformly random position
  fully inside the canvas, drawn in a random foreground colour;
* a random background colour whose luma (BT.601, 0..255) differs from the
  foreground's by at least 96, so the digit is always clearly visible;
* clutter: 2 to 4 fragments (uniform), each a random 3x3 or 4x4 crop of the
  source pixels of ANOTHER digit of the same split with a DIFFERENT label (the
  first of 8 random crops with mean ink in [0.25, 0.6]), given a blank one-pixel
  border (so its cut edges fade out) and upscaled by 0.7 times the main digit's
  pixels-per-source-pixel factor (`FRAGMENT_SCALE`: strokes a bit thinner than
  the digit's, so fragments read as small pieces rather than as rival digits),
  in its own random colour (also >= 96 luma away from the background).
  A fragment goes to the first of 20 random positions where at most 10% of its
  ink falls inside a keep-out box (the main digit's ink box grown by half a
  source pixel), or, if none qualifies, to the least overlapping one. The main
  digit is painted last, so clutter never hides its ink.

Features:

* `image`: uint8 (S, S, 3).
* `label`: ClassLabel with names "0" .. "9" (the main digit's class).
* `bbox`: BBoxFeature, float32 (4,), normalised [ymin, xmin, ymax, xmax] of the
  TIGHT box around the main digit's ink. Ink is every canvas pixel whose
  bilinear digit intensity is >= 0.5 of full ink (`INK_THRESHOLD`); the box uses
  pixel edges (ymin = first ink row / S, ymax = (last ink row + 1) / S), so it
  is usually smaller than the placed square.
* `source_index`: int32 index of the main digit in `load_digits()`.

Splits are made BY SOURCE DIGIT with a fixed permutation of the 1,797 indices
(`numpy.random.default_rng([DEFAULT_SEED, 0]).permutation(1797)`): its first
1,437 entries are the train digits and the other 360 the test digits. Clutter is
cut only from digits of the same split, so no source digit appears in both
splits, neither as main digit nor as clutter.

    split   source digits   placements per digit   examples
    train   1,437           4                      5,748
    test    360             2                        720

Generation is deterministic: example (split, source_index, placement) is
rendered from `numpy.random.default_rng([DEFAULT_SEED, split_id, source_index,
placement])` with split_id 0 for train and 1 for test, so two builds give
byte-identical examples (NumPy keeps `Generator` streams stable across releases
in practice, but only promises it for a given version).

Builder configs: `size48` (48x48, the default) and `size64` (64x64). Any other
size >= 16 works through a custom config, e.g.
`tfds.builder("cluttered_digits", config=ClutteredDigitsConfig(name="size32",
image_size=32))`.

Holdout configs (`holdout=True`, named f"size{S}_holdout"; `config_for_size(S,
holdout=True)`) are for tuning without the test split: the same train examples,
split BY SOURCE DIGIT into `train` (the other 6 of every 7 train digits) and
`validation` (every 7th train digit, `holdout_source_indices`), plus the
unchanged `test` split. Every example is byte-identical to the one of the
ordinary config (clutter still comes from all train digits), so a holdout run
trains on a subset of the ordinary training data and never sees a test digit:

    split        source digits   placements per digit   examples
    train        1,231           4                      4,924
    validation   206             4                        824
    test         360             2                        720
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

DEFAULT_SEED = 20_211_001
"""Base seed of the split permutation and of every example's generator."""

MIN_IMAGE_SIZE = 16
"""Smallest accepted canvas side; below it digits and clutter become specks."""

DEFAULT_IMAGE_SIZE = 48

NUM_SOURCE_DIGITS = 1_797
NUM_TRAIN_SOURCE_DIGITS = 1_437
NUM_TEST_SOURCE_DIGITS = 360
PLACEMENTS_PER_DIGIT = {"train": 4, "test": 2}
SPLIT_IDS = {"train": 0, "test": 1}
# Holdout configs validate on every HOLDOUT_EVERY-th train source digit.
HOLDOUT_EVERY = 7

# `load_digits()` pixels count the set pixels of 4x4 blocks, hence 0..16.
SOURCE_MAX_VALUE = 16.0
SOURCE_SIDE = 8

MIN_DIGIT_FRACTION = 0.4
MAX_DIGIT_FRACTION = 0.7
INK_THRESHOLD = 0.5
MIN_LUMA_CONTRAST = 96.0
MIN_FRAGMENTS = 2
MAX_FRAGMENTS = 4
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

_CLASS_NAMES = [str(digit) for digit in range(10)]

_DESCRIPTION = """\
Real handwritten digits (scikit-learn's 1,797 8x8 `load_digits` images) drawn at
a random scale (40%-70% of the canvas side) and position on a square RGB canvas
with random, well-contrasted foreground and background colours, plus 2-4
clutter fragments cut from digits of other classes, in their own colours.
Features: the image, the main digit's label, the tight bounding box of its ink
and the index of its source digit. Train and test are split by source digit
(1,437 / 360 digits, 4 / 2 placements each: 5,748 / 720 examples). Every example
comes from a fixed-seed generator, so builds are reproducible.
"""

_CITATION = """\
@InProceedings{Pillai_2022_CVPR,
  author    = {Pillai, Vipin and Koohpayegani, Soroush Abbasi and Ouligian, Ashley and Fong, Dennis and Pirsiavash, Hamed},
  title     = {Consistent Explanations by Contrastive Learning},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  month     = {June},
  year      = {2022},
  pages     = {10213-10222}
}
"""


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


@functools.lru_cache(maxsize=1)
def load_source_digits():
    """Loads the scikit-learn handwritten digits (bundled with sklearn, offline).

    Returns:
      (images, labels): images float64 [1797, 8, 8] with values in [0, 16];
      labels int64 [1797] with values in [0, 9]. Both are read-only because
      the cached arrays are shared by every caller.
    """
    # Imported here so that importing (registering) the builder stays cheap.
    from sklearn import datasets

    digits = datasets.load_digits()
    images = np.asarray(digits.images, dtype=np.float64)
    labels = np.asarray(digits.target, dtype=np.int64)
    expected_shape = (NUM_SOURCE_DIGITS, SOURCE_SIDE, SOURCE_SIDE)
    if images.shape != expected_shape:
        raise ValueError(
            f"sklearn.datasets.load_digits() returned images of shape {images.shape}; "
            f"cluttered_digits expects {expected_shape}"
        )
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def split_source_indices(split, seed=DEFAULT_SEED):
    """Returns the source-digit indices of `split`.

    Args:
      split: "train" or "test".
      seed: int, base seed of the fixed permutation.

    Returns:
      int64 [1437] (train) or [360] (test), sorted ascending. The two splits are
      disjoint and together cover all 1,797 digits.

    Raises:
      ValueError: if `split` is not "train" or "test".
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    # Two-entry seed: can never collide with the four-entry per-example seeds.
    permutation = np.random.default_rng([seed, 0]).permutation(NUM_SOURCE_DIGITS)
    if split == "train":
        chosen = permutation[:NUM_TRAIN_SOURCE_DIGITS]
    else:
        chosen = permutation[NUM_TRAIN_SOURCE_DIGITS:]
    return np.sort(chosen).astype(np.int64)


def holdout_source_indices(seed=DEFAULT_SEED):
    """Returns the train source digits that holdout configs use for `validation`.

    Args:
      seed: int, base seed of the fixed permutation (see `split_source_indices`).

    Returns:
      int64 [206]: every HOLDOUT_EVERY-th entry of `split_source_indices("train")`
      (positions 0, 7, 14, ...), sorted ascending.
    """
    return split_source_indices("train", seed)[::HOLDOUT_EVERY]


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


def _generate_from_arrays(images, labels, split_sources, split_id, source_index, placement,
                          image_size, seed):
    """Unchecked core shared by `generate_example` and the builder (see there)."""
    rng = np.random.default_rng([seed, split_id, source_index, placement])
    label = int(labels[source_index])
    # Clutter comes only from the same split (keeps the splits disjoint) and
    # from other classes (a genuine distractor, never a second copy of the answer).
    candidates = split_sources[labels[split_sources] != label]
    fragment_count = int(rng.integers(MIN_FRAGMENTS, MAX_FRAGMENTS + 1))
    clutter_indices = rng.choice(candidates, size=fragment_count, replace=False)
    image, bbox, ink_mask = render_example(
        images[source_index], rng, image_size, images[clutter_indices]
    )
    example = {"image": image, "label": label, "bbox": bbox, "source_index": source_index}
    return example, ink_mask


def generate_example(split, source_index, placement, image_size, seed=DEFAULT_SEED):
    """Regenerates example (split, source_index, placement) exactly as the builder stores it.

    Args:
      split: "train" or "test".
      source_index: int, index of the main digit in `load_digits()`; must be a
        source digit of `split`.
      placement: int in [0, PLACEMENTS_PER_DIGIT[split]).
      image_size: int >= 16, the canvas side S.
      seed: int, base seed (the builder uses DEFAULT_SEED).

    Returns:
      (example, ink_mask): `example` is a dict with "image" uint8 [S, S, 3],
      "label" int, "bbox" float32 [4] and "source_index" int; `ink_mask` is the
      bool [S, S] mask of `render_example`.

    Raises:
      ValueError: if `split`, `source_index`, `placement` or `image_size` is
        invalid.
    """
    images, labels = load_source_digits()
    split_sources = split_source_indices(split, seed)
    if source_index not in set(split_sources.tolist()):
        raise ValueError(
            f"source_index must be a source digit of split {split!r} (see "
            f"split_source_indices), got {source_index!r}"
        )
    placements = PLACEMENTS_PER_DIGIT[split]
    if not 0 <= placement < placements:
        raise ValueError(
            f"placement must be in [0, {placements}) for split {split!r}, got {placement!r}"
        )
    return _generate_from_arrays(
        images,
        labels,
        split_sources,
        SPLIT_IDS[split],
        int(source_index),
        int(placement),
        validate_image_size(image_size),
        seed,
    )


@dataclasses.dataclass(eq=False)
class ClutteredDigitsConfig(tfds.core.BuilderConfig):
    """Builder config of `cluttered_digits`.

    Attributes:
      image_size: int >= 16, the canvas side S; images are uint8 [S, S, 3].
      holdout: bool; True splits the train digits into `train` and `validation`
        (see the module docstring).
    """

    image_size: int = DEFAULT_IMAGE_SIZE
    holdout: bool = False

    def __post_init__(self):
        validate_image_size(self.image_size)
        if self.description is None:
            self.description = f"{self.image_size}x{self.image_size} RGB canvases."


def config_for_size(image_size, holdout=False):
    """Returns the config for `image_size`: the predefined one, or a new custom one.

    Args:
      image_size: int >= 16, the canvas side.
      holdout: bool, the holdout config (train / validation / test splits).

    Returns:
      The `ClutteredDigitsConfig` named f"size{image_size}" (f"size{image_size}_holdout"
      with `holdout`). For 48 and 64 without holdout it is the very object in
      `ClutteredDigits.BUILDER_CONFIGS`, because tfds rejects a different object
      that reuses a predefined name.

    Raises:
      ValueError: if `image_size` is not an integer >= 16.
    """
    image_size = validate_image_size(image_size)
    for config in ClutteredDigits.BUILDER_CONFIGS:
        if config.image_size == image_size and config.holdout == bool(holdout):
            return config
    suffix = "_holdout" if holdout else ""
    return ClutteredDigitsConfig(
        name=f"size{image_size}{suffix}", image_size=image_size, holdout=bool(holdout)
    )


class ClutteredDigits(tfds.core.GeneratorBasedBuilder):
    """tfds builder of `cluttered_digits` (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": (
            "Initial release: scikit-learn digits at random scale and position on "
            "random-colour canvases with 2-4 fragments of other-class digits; tight "
            "ink bounding boxes; split by source digit (1,437 / 360 digits, "
            "5,748 / 720 examples)."
        ),
    }
    BUILDER_CONFIGS = [
        ClutteredDigitsConfig(name="size48", image_size=48),
        ClutteredDigitsConfig(name="size64", image_size=64),
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """epath.Path of this module (tfds looks for checksums.tsv next to it)."""
        # tfds 4.9.10's default evaluates `importlib_resources.abc.Traversable`
        # for every builder defined in a package, and that optional backport is
        # not installed, so the default raises ModuleNotFoundError in
        # download_and_prepare.
        return epath.Path(inspect.getfile(cls))

    def _info(self):
        image_size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(image_size, image_size, 3), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(names=_CLASS_NAMES),
                    "bbox": tfds.features.BBoxFeature(
                        doc="Tight box around the main digit's ink: [ymin, xmin, ymax, "
                        "xmax] normalised to [0, 1]."
                    ),
                    "source_index": tfds.features.Scalar(
                        dtype=np.int32,
                        doc="Index of the main digit in sklearn.datasets.load_digits().",
                    ),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=None,
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is rendered locally; nothing to download.
        if not self.builder_config.holdout:
            return {split: self._generate_examples(split) for split in SPLIT_IDS}
        held_out = holdout_source_indices()
        return {
            "train": self._generate_examples("train", exclude=held_out),
            "validation": self._generate_examples("train", only=held_out),
            "test": self._generate_examples("test"),
        }

    def _generate_examples(self, split, only=None, exclude=None) -> Iterator[tuple[str, dict]]:
        """Examples of `split`'s source digits, restricted to `only` / without `exclude`."""
        images, labels = load_source_digits()
        split_sources = split_source_indices(split)
        main_digits = split_sources
        if only is not None:
            main_digits = main_digits[np.isin(main_digits, only)]
        if exclude is not None:
            main_digits = main_digits[~np.isin(main_digits, exclude)]
        image_size = self.builder_config.image_size
        for source_index in main_digits.tolist():
            for placement in range(PLACEMENTS_PER_DIGIT[split]):
                example, _ = _generate_from_arrays(
                    images,
                    labels,
                    split_sources,
                    SPLIT_IDS[split],
                    source_index,
                    placement,
                    image_size,
                    DEFAULT_SEED,
                )
                yield f"{source_index:04d}_{placement}", example
