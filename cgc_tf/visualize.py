"""Heatmap overlays and image grids (numpy, Pillow, matplotlib's Agg renderer).

`overlay`/`overlays` blend a colour-mapped heatmap over an image (for reports and
TensorBoard image summaries); `save_grid` writes a titled grid of images to a PNG;
`consistency_grid` lays out the evaluation grid of `cgc-evaluate`:
image | Grad-CAM | T(x) | cam(T(x)) | T(cam(x)), with the models being compared side
by side in each heatmap column.

Figures are drawn with `matplotlib.figure.Figure` and the Agg canvas directly, not
pyplot, so no global backend or GUI state is touched.
"""

import os

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

# Inches per grid cell and the resolution of saved grids.
_CELL_INCHES = 1.7
_DPI = 100


def _to_float_image(image, name="image"):
    """float32 [H, W, 3] in [0, 1] from uint8 or float [H, W, 3] / [H, W, 1] / [H, W]."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(
            f"`{name}` must have shape [H, W, 3], [H, W, 1] or [H, W]; received {image.shape}."
        )
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return np.clip(image.astype(np.float32), 0.0, 1.0)


def _to_uint8(image):
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def normalize_heatmap(heatmap, size=None):
    """A heatmap scaled to [0, 1] by its maximum, optionally resized bilinearly.

    Args:
      heatmap: float [h, w], non-negative, any scale.
      size: optional (H, W) output size.

    Returns:
      float32 [H, W] in [0, 1]; all zeros if the heatmap is all zero.
    """
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"`heatmap` must have shape [H, W]; received {heatmap.shape}.")
    if size is not None and tuple(heatmap.shape) != tuple(size):
        resized = Image.fromarray(heatmap).resize(  # float32 [H, W]: mode "F"
            (int(size[1]), int(size[0])), Image.BILINEAR
        )
        heatmap = np.asarray(resized, dtype=np.float32)
    heatmap = np.maximum(np.nan_to_num(heatmap), 0.0)
    peak = heatmap.max()
    return heatmap / peak if peak > 0 else np.zeros_like(heatmap)


def colorize(heatmap, colormap="jet", size=None):
    """uint8 [H, W, 3]: the max-normalised heatmap through a matplotlib colormap."""
    if colormap not in colormaps:
        raise ValueError(
            f"`colormap` must be a matplotlib colormap name (e.g. 'jet', 'viridis', "
            f"'inferno'); received {colormap!r}."
        )
    values = normalize_heatmap(heatmap, size)
    return _to_uint8(colormaps[colormap](values)[..., :3])


def overlay(image, heatmap, alpha=0.5, colormap="jet"):
    """Blends a colour-mapped heatmap over an image.

    Args:
      image: float [H, W, 3] in [0, 1] or uint8 [H, W, 3] (grey [H, W] or
        [H, W, 1] is repeated to RGB).
      heatmap: float [h, w], non-negative, any scale; max-normalised and resized
        bilinearly to [H, W].
      alpha: float in [0, 1], the heatmap's weight.
      colormap: matplotlib colormap name.

    Returns:
      uint8 [H, W, 3].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1]; received {alpha!r}.")
    image = _to_float_image(image)
    colours = colorize(heatmap, colormap, size=image.shape[:2]).astype(np.float32) / 255.0
    return _to_uint8((1.0 - alpha) * image + alpha * colours)


def overlays(images, heatmaps, alpha=0.5, colormap="jet"):
    """Batched `overlay`, e.g. for `tf.summary.image`.

    Args:
      images: float [N, H, W, 3] in [0, 1] or uint8 (numpy or tf.Tensor).
      heatmaps: float [N, h, w], non-negative.
      alpha, colormap: as in `overlay`.

    Returns:
      uint8 [N, H, W, 3].
    """
    images = np.asarray(images)
    heatmaps = np.asarray(heatmaps)
    if images.ndim != 4 or heatmaps.ndim != 3 or len(images) != len(heatmaps):
        raise ValueError(
            "`images` must be [N, H, W, 3] and `heatmaps` [N, h, w] with the same N; "
            f"received {images.shape} and {heatmaps.shape}."
        )
    if len(images) == 0:
        return np.zeros((0,) + images.shape[1:3] + (3,), np.uint8)
    return np.stack(
        [overlay(image, heatmap, alpha, colormap) for image, heatmap in zip(images, heatmaps)]
    )


def _draw_boxes(axis, boxes, height, width):
    """Outlines normalised [ymin, xmin, ymax, xmax] boxes; all-negative rows are padding."""
    for ymin, xmin, ymax, xmax in np.asarray(boxes, np.float32).reshape(-1, 4):
        if max(ymin, xmin, ymax, xmax) < 0:
            continue
        # Pixel i covers [i - 0.5, i + 0.5] in imshow's coordinates.
        axis.add_patch(
            Rectangle(
                (xmin * width - 0.5, ymin * height - 0.5),
                (xmax - xmin) * width,
                (ymax - ymin) * height,
                fill=False,
                edgecolor="white",
                linewidth=1.2,
                linestyle="--",
            )
        )


def save_grid(path, rows, column_titles=None, row_titles=None, captions=None, boxes=None):
    """Writes a grid of images with titles to a PNG.

    Args:
      path: output file (the directory is created).
      rows: list of rows, each a list of images (uint8 or float [H, W, 3] in [0, 1]),
        all rows the same length.
      column_titles: optional list of str, one per column, above the first row.
      row_titles: optional list of str, one per row, left of the row.
      captions: optional list of rows of str (or None), shown under each cell.
      boxes: optional list of rows of float [M, 4] normalised [ymin, xmin, ymax,
        xmax] boxes (or None) outlined on each cell.

    Returns:
      `path`.
    """
    if not rows or not all(len(row) == len(rows[0]) for row in rows) or not rows[0]:
        raise ValueError(
            "`rows` must be a non-empty list of non-empty rows of equal length; received "
            f"row lengths {[len(row) for row in rows]}."
        )
    num_rows, num_columns = len(rows), len(rows[0])
    for argument, values, expected in (
        ("column_titles", column_titles, num_columns),
        ("row_titles", row_titles, num_rows),
        ("captions", captions, num_rows),
        ("boxes", boxes, num_rows),
    ):
        if values is not None and len(values) != expected:
            raise ValueError(
                f"`{argument}` must have {expected} entries; received {len(values)}."
            )
    figure = Figure(
        figsize=(_CELL_INCHES * num_columns, _CELL_INCHES * num_rows + 0.4), dpi=_DPI
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(num_rows, num_columns, squeeze=False)
    for row_index, row in enumerate(rows):
        for column_index, image in enumerate(row):
            axis = axes[row_index][column_index]
            image = _to_float_image(image, "rows[...]")
            axis.imshow(image, interpolation="nearest")
            if boxes is not None and boxes[row_index][column_index] is not None:
                _draw_boxes(axis, boxes[row_index][column_index], *image.shape[:2])
            axis.set_xticks([])
            axis.set_yticks([])
            if row_index == 0 and column_titles is not None:
                axis.set_title(column_titles[column_index], fontsize=8)
            if column_index == 0 and row_titles is not None:
                axis.set_ylabel(row_titles[row_index], fontsize=8)
            if captions is not None and captions[row_index][column_index]:
                axis.set_xlabel(captions[row_index][column_index], fontsize=7)
    figure.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def consistency_grid(
    path,
    images,
    transformed_images,
    explanations,
    row_titles=None,
    alpha=0.5,
    colormap="jet",
    boxes=None,
):
    """The evaluation grid: image | Grad-CAM | T(x) | cam(T(x)) | T(cam(x)).

    With several models, each heatmap column holds one sub-column per model, side
    by side on the same images and transforms.

    Args:
      path: output PNG.
      images: float [N, H, W, 3] in [0, 1], the images x.
      transformed_images: float [N, H, W, 3], T(x).
      explanations: dict model name -> dict with float [N, H, W] arrays
        "heatmap" (cam(x)), "transformed_heatmap" (cam(T(x))) and
        "warped_heatmap" (T(cam(x))); optional "captions" list of N str shown
        under the model's cam(T(x)) cell (e.g. the cosine).
      row_titles: optional list of N str (e.g. label and predictions).
      alpha, colormap: as in `overlay`.
      boxes: optional float [N, M, 4] normalised ground-truth boxes, outlined on
        x and cam(x) (T moves them, so they are not drawn on T(x)).

    Returns:
      `path`.
    """
    images = np.asarray(images)
    transformed_images = np.asarray(transformed_images)
    if not explanations:
        raise ValueError("`explanations` must name at least one model; received none.")
    names = list(explanations)
    keys = ("heatmap", "transformed_heatmap", "warped_heatmap")
    for name in names:
        missing = [key for key in keys if key not in explanations[name]]
        if missing:
            raise ValueError(
                f"`explanations[{name!r}]` lacks {missing}; it needs the keys {list(keys)}."
            )
    prefix = (lambda name: f"{name}: ") if len(names) > 1 else (lambda name: "")
    column_titles = ["x"]
    column_titles += [f"{prefix(name)}cam(x)" for name in names]
    column_titles += ["T(x)"]
    column_titles += [f"{prefix(name)}cam(T(x))" for name in names]
    column_titles += [f"{prefix(name)}T(cam(x))" for name in names]
    rows, captions, cell_boxes = [], [], []
    for index in range(len(images)):
        image, transformed = images[index], transformed_images[index]
        row = [image]
        row += [overlay(image, explanations[n]["heatmap"][index], alpha, colormap) for n in names]
        row += [transformed]
        row += [
            overlay(transformed, explanations[n]["transformed_heatmap"][index], alpha, colormap)
            for n in names
        ]
        row += [
            overlay(transformed, explanations[n]["warped_heatmap"][index], alpha, colormap)
            for n in names
        ]
        rows.append(row)
        cell_captions = [""] * len(row)
        for offset, name in enumerate(names):
            name_captions = explanations[name].get("captions")
            if name_captions is not None:
                cell_captions[len(names) + 2 + offset] = name_captions[index]
        captions.append(cell_captions)
        row_boxes = [None] * len(row)
        if boxes is not None:
            row_boxes[: 1 + len(names)] = [boxes[index]] * (1 + len(names))
        cell_boxes.append(row_boxes)
    return save_grid(path, rows, column_titles, row_titles, captions, cell_boxes)


def save_curves(path, fractions, curves, title=None):
    """Writes insertion and deletion curves side by side to a PNG.

    Args:
      path: output file (the directory is created).
      fractions: float [S] fraction of pixels inserted/deleted at each step.
      curves: dict name -> (insertion float [S], deletion float [S]), e.g. the
        mean curves of each model; the legend shows each curve's AUC.
      title: optional figure title.

    Returns:
      `path`.
    """
    fractions = np.asarray(fractions, np.float64)
    figure = Figure(figsize=(8.0, 3.2), dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, squeeze=False)[0]
    for axis, index, label in ((axes[0], 0, "insertion"), (axes[1], 1, "deletion")):
        for name, pair in curves.items():
            values = np.asarray(pair[index], np.float64)
            area = float(np.sum(0.5 * (values[1:] + values[:-1]) * np.diff(fractions)))
            axis.plot(fractions, values, label=f"{name} (AUC {area:.3f})")
        axis.set_xlabel(f"fraction of pixels {'inserted' if index == 0 else 'deleted'}")
        axis.set_ylabel("probability of the class")
        axis.set_title(label, fontsize=9)
        axis.set_xlim(0.0, 1.0)
        axis.set_ylim(0.0, 1.0)
        axis.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, format="png")
    return path
