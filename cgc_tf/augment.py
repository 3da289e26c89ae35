"""Paired geometric transforms: one random T per example, for images and heatmaps.

CGC (METHOD.md, steps 1 and 6) samples a geometric transform T per example, applies it
to the deterministic view to get `x_aug = T(x_orig)`, and later applies the *same* T,
differentiably, to the Grad-CAM heatmap of `x_orig`. `PairedAugmentation` separates the
two halves: `sample()` draws the per-example parameters as a dict of tensors, and
`apply_to_images()` / `apply_to_heatmaps()` apply them.

T is the paper's: a random resized crop (area fraction in `area_range`, aspect ratio
log-uniform in `aspect_ratio_range`, as torchvision's RandomResizedCrop), resized
bilinearly back to the input size, then a horizontal flip. `crop_mode="torchvision"`
(what cgc-train uses) draws integer pixel crops exactly as torchvision and resamples
them as the reference does (`resized_crop`: torch's F.interpolate, align_corners=False);
the default "continuous" draws sub-pixel boxes resampled as tf.image.crop_and_resize
(`crop_flip_resize`). Both are per-example separable bilinear taps (gathers): linear in
the input (so differentiable), vectorised over the batch, XLA-compilable.

Extra geometric layers from keras-cv or Keras (rotation, zoom, ...) can follow. The
common ones (see `_PROJECTIVE_MATRICES`) are applied with `projective_transform`, a
gather-based copy of the ImageProjectiveTransformV3 kernel that, unlike the op, compiles
under XLA and has the exact transpose as its gradient; others run the layer's own code.

This is the only module of the project that imports keras_cv (STYLE.md): keras-cv no
longer gets releases, so its use stays in one place.
"""

import copy
import math
import numbers

import keras
import keras_cv
import tensorflow as tf

# How T's crop is drawn and resampled (PairedAugmentation's `crop_mode`).
CROP_MODES = ("continuous", "torchvision")
# torchvision's RandomResizedCrop tries 10 (area, ratio) candidates before falling back.
_NUM_CROP_CANDIDATES = 10
# Sampling coordinates this close (in pixels) outside the image count as on its border.
# Float rounding can put the last sample of a box whose edge is exactly 1.0 a hair past
# the last pixel, where tf.image.crop_and_resize would output a whole row of zeros.
_BORDER_TOLERANCE = 1e-3
# Slack on a box side (as a fraction of the image side) when testing that it fits.
_FIT_TOLERANCE = 1e-6

# The geometric code has no tensor-dependent Python control flow. Skipping AutoGraph's
# source conversion (of this module and of the keras-cv methods it calls) cuts the
# tf.function tracing time of a PairedAugmentation with keras-cv layers by seconds.
_no_autograph = tf.autograph.experimental.do_not_convert


_KERAS_CV_GEOMETRIC_NAMES = (
    "RandomRotation",
    "RandomZoom",
    "RandomTranslation",
    "RandomShear",
    "RandomFlip",
    "RandomCrop",
    "RandomCropAndResize",
    "RandomAspectRatio",
    "JitteredResize",
    "Resizing",
)
_KERAS_GEOMETRIC_NAMES = (
    "RandomRotation",
    "RandomZoom",
    "RandomTranslation",
    "RandomShear",
    "RandomFlip",
    "RandomCrop",
    "RandomPerspective",
    "RandomElasticTransform",
    "Resizing",
)


def _classes(module, names):
    return tuple(getattr(module, name) for name in names if hasattr(module, name))


# Layers that move pixels: applying them to images only would break the pairing.
_GEOMETRIC_LAYER_CLASSES = _classes(
    keras_cv.layers, _KERAS_CV_GEOMETRIC_NAMES
) + _classes(keras.layers, _KERAS_GEOMETRIC_NAMES)


def _interpolation_taps(start, end, input_size, output_size):
    """Bilinear resampling taps along one axis, as tf.image.crop_and_resize samples.

    Args:
        start: float32 [B], normalised box start (y1 or x1).
        end: float32 [B], normalised box end (y2 or x2).
        input_size: int or int32 scalar tensor, the input length along the axis.
        output_size: Python int, the output length along the axis.

    Returns:
        (lower_index, upper_index, lower_weight, upper_weight), each [B, output_size]:
        int32 indices and float32 weights. Output sample i is
        `lower_weight[i] * input[lower_index[i]] + upper_weight[i] * input[upper_index[i]]`;
        both weights are 0 where the sample falls outside the input (the extrapolation
        value 0).
    """
    last = tf.cast(input_size - 1, tf.float32)
    # Same float32 expressions, in the same order, as the crop_and_resize CPU kernel, so
    # floor() picks the same neighbours and the outputs match to rounding.
    if output_size > 1:
        scale = (end - start) * last / float(output_size - 1)
        positions = tf.range(output_size, dtype=tf.float32)
        coordinates = start[:, None] * last + positions[None, :] * scale[:, None]
    else:
        coordinates = (0.5 * (start + end) * last)[:, None]
    inside = tf.cast(
        tf.logical_and(
            coordinates >= -_BORDER_TOLERANCE, coordinates <= last + _BORDER_TOLERANCE
        ),
        tf.float32,
    )
    lower = tf.floor(coordinates)
    fraction = coordinates - lower
    lower_index = tf.cast(tf.clip_by_value(lower, 0.0, last), tf.int32)
    upper_index = tf.cast(tf.clip_by_value(tf.math.ceil(coordinates), 0.0, last), tf.int32)
    return lower_index, upper_index, (1.0 - fraction) * inside, fraction * inside


def _resample_rows(images, taps):
    """Applies `_interpolation_taps` along axis 1 of images [B, H, W, C]."""
    lower_index, upper_index, lower_weight, upper_weight = taps
    lower = tf.gather(images, lower_index, axis=1, batch_dims=1)
    upper = tf.gather(images, upper_index, axis=1, batch_dims=1)
    lower_weight = tf.cast(lower_weight, images.dtype)[:, :, None, None]
    upper_weight = tf.cast(upper_weight, images.dtype)[:, :, None, None]
    return lower * lower_weight + upper * upper_weight


def _static_or_dynamic(tensor, axis):
    static = tensor.shape[axis]
    return static if static is not None else tf.shape(tensor)[axis]


def _check_output_size(output_size):
    if (
        not isinstance(output_size, (tuple, list))
        or len(output_size) != 2
        or not all(isinstance(size, numbers.Integral) and size > 0 for size in output_size)
    ):
        raise ValueError(
            "`output_size` must be two positive Python ints (height, width); "
            f"received {output_size!r}."
        )
    return int(output_size[0]), int(output_size[1])


@_no_autograph
def crop_flip_resize(images, boxes, flips, output_size):
    """Crops a box per example, resizes it bilinearly, then flips it horizontally.

    Matches `tf.image.crop_and_resize(images, boxes, tf.range(B), output_size)` (bilinear,
    extrapolation value 0) followed by `tf.image.flip_left_right` where `flips` is true.
    We do not call those ops because `CropAndResize` (like `ImageProjectiveTransformV3`)
    has no XLA kernel: instead the op is separable bilinear taps per example (each output
    pixel reads two input rows, then two input columns; the flip reverses the column
    taps), applied with batched gathers. It is linear in `images`, so gradients flow to
    them (the gathers' gradient, a scatter-add, is the exact transpose), and it compiles
    with `jit_compile=True`. One deliberate difference: a sample within 1e-3 pixel
    outside the image (float rounding for a box edge at exactly 0 or 1) reads the border
    pixel instead of the extrapolation value 0.

    Args:
        images: float [B, H, W, C]. Integer images are cast to float32.
        boxes: float32 [B, 4], normalised `[y1, x1, y2, x2]` in the crop_and_resize
            convention: 0 and 1 are the centres of the first and last pixels.
        flips: bool or float [B]; true (nonzero) flips the example left-right.
        output_size: two Python ints (out_h, out_w).

    Returns:
        [B, out_h, out_w, C], with the dtype of `images` (float32 for integer images).
    """
    output_height, output_width = _check_output_size(output_size)
    images = tf.convert_to_tensor(images)
    if not images.dtype.is_floating:
        images = tf.cast(images, tf.float32)
    if images.shape.rank != 4:
        raise ValueError(
            f"`images` must have rank 4 [B, H, W, C]; received shape {images.shape}."
        )
    boxes = tf.cast(boxes, tf.float32)
    flips = tf.cast(flips, tf.bool)
    rows = _interpolation_taps(
        boxes[:, 0], boxes[:, 2], _static_or_dynamic(images, 1), output_height
    )
    columns = _interpolation_taps(
        boxes[:, 1], boxes[:, 3], _static_or_dynamic(images, 2), output_width
    )
    columns = tuple(
        tf.where(flips[:, None], tf.reverse(taps, axis=[1]), taps) for taps in columns
    )
    # Gathers cost O(output pixels); the dense [B, out, in] interpolation matrices this
    # replaced (two einsums) cost O(output pixels x input side). Gathering whole rows
    # (axis 1) is faster on CPU than gathering along axis 2, hence the transposes.
    # benchmarks/crop_flip_resize.py measures both, with and without XLA.
    resized = _resample_rows(images, rows)
    resized = _resample_rows(tf.transpose(resized, [0, 2, 1, 3]), columns)
    return tf.transpose(resized, [0, 2, 1, 3])


def _half_pixel_taps(start, length, output_size):
    """Bilinear taps of torch's `F.interpolate(crop, mode="bilinear", align_corners=False)`.

    Along one axis, for the crop `input[start : start + length]` resized to
    `output_size`: source = max((o + 0.5) * length / output_size - 0.5, 0) within the
    crop, neighbours floor(source) and min(floor(source) + 1, length - 1), with
    torch's float32 expressions (upsample_bilinear2d's CPU kernel).

    Args:
        start: int32 [B], first pixel of the crop.
        length: int32 [B], pixels in the crop (>= 1).
        output_size: Python int.

    Returns:
        (lower_index, upper_index, lower_weight, upper_weight), each [B, output_size]
        (int32 indices into the whole axis, float32 weights).
    """
    start = tf.cast(start, tf.int32)[:, None]
    length = tf.cast(length, tf.int32)[:, None]
    scale = tf.cast(length, tf.float32) / float(output_size)
    positions = tf.range(output_size, dtype=tf.float32)[None, :]
    source = tf.maximum(scale * (positions + 0.5) - 0.5, 0.0)
    lower = tf.floor(source)
    fraction = source - lower
    lower_index = tf.minimum(tf.cast(lower, tf.int32), length - 1)
    upper_index = tf.minimum(lower_index + 1, length - 1)
    return start + lower_index, start + upper_index, 1.0 - fraction, fraction


@_no_autograph
def resized_crop(images, crops, flips, output_size):
    """torchvision's resized crop + flip on tensors, as the reference warps heatmaps.

    Per example b with crop (i, j, h, w) = crops[b]: `F.interpolate(images[b, i:i+h,
    j:j+w], output_size, mode="bilinear", align_corners=False)` (no antialiasing),
    flipped left-right where `flips[b]`: the reference's `perform_gradcam_aug`
    (models/utils.py) and, for images, torchvision's `resized_crop` up to PIL's
    uint8 rounding. Separable bilinear taps applied with batched gathers, as in
    `crop_flip_resize`: linear in `images` (its gradient is the exact transpose) and
    XLA-compilable.

    Args:
        images: float [B, H, W, C]. Integer images are cast to float32.
        crops: int32 [B, 4] pixel crops (top i, left j, height h, width w) inside the
            image, h, w >= 1.
        flips: bool or float [B]; true (nonzero) flips the example left-right.
        output_size: two Python ints (out_h, out_w).

    Returns:
        [B, out_h, out_w, C], with the dtype of `images` (float32 for integer images).
    """
    output_height, output_width = _check_output_size(output_size)
    images = tf.convert_to_tensor(images)
    if not images.dtype.is_floating:
        images = tf.cast(images, tf.float32)
    if images.shape.rank != 4:
        raise ValueError(
            f"`images` must have rank 4 [B, H, W, C]; received shape {images.shape}."
        )
    crops = tf.cast(crops, tf.int32)
    flips = tf.cast(flips, tf.bool)
    rows = _half_pixel_taps(crops[:, 0], crops[:, 2], output_height)
    columns = _half_pixel_taps(crops[:, 1], crops[:, 3], output_width)
    columns = tuple(
        tf.where(flips[:, None], tf.reverse(taps, axis=[1]), taps) for taps in columns
    )
    resized = _resample_rows(images, rows)
    resized = _resample_rows(tf.transpose(resized, [0, 2, 1, 3]), columns)
    return tf.transpose(resized, [0, 2, 1, 3])


def _truncate(values):
    """Rounds toward zero, as the C++ static_cast<int> in the TF kernel."""
    return tf.sign(values) * tf.floor(tf.abs(values))


def _map_coordinates(coordinates, size, fill_mode):
    """ImageProjectiveTransformV3's MapCoordinate: folds coordinates into the image."""
    length = float(size)
    last = length - 1.0
    if fill_mode == "constant":
        return coordinates
    if fill_mode == "nearest":
        return tf.clip_by_value(coordinates, 0.0, last)
    if size <= 1:
        return tf.zeros_like(coordinates)
    if fill_mode == "reflect":
        # [abcd] -> [dcba|abcd|dcba], with the kernel's float arithmetic.
        period = 2.0 * length
        below = tf.where(
            coordinates < period,
            period * _truncate(-coordinates / period) + coordinates,
            coordinates,
        )
        below = tf.where(below < -length, below + period, -below - 1.0)
        above = coordinates - period * _truncate(coordinates / period)
        above = tf.where(above >= length, period - above - 1.0, above)
    elif fill_mode == "wrap":
        # [abcd] -> [abcd|abcd|abcd], with the kernel's float arithmetic.
        below = coordinates + length * (_truncate(-coordinates / last) + 1.0)
        above = coordinates - length * _truncate(coordinates / last)
    else:
        raise ValueError(
            f"`fill_mode` must be one of 'constant', 'nearest', 'reflect', 'wrap'; "
            f"received {fill_mode!r}."
        )
    mapped = tf.where(
        coordinates < 0.0, below, tf.where(coordinates > last, above, coordinates)
    )
    return tf.clip_by_value(mapped, 0.0, last)


@_no_autograph
def projective_transform(
    images, transforms, fill_mode="constant", fill_value=0.0, interpolation="bilinear"
):
    """XLA-compilable ImageProjectiveTransformV3 (output size = input size).

    `ImageProjectiveTransformV3`, which keras-cv and Keras use to rotate, zoom, translate
    and shear, has no XLA kernel, and its registered gradient is the inverse warp, which
    is not the transpose of the bilinear warp (about 8% relative error measured on a
    rotation). This reimplements the kernel's coordinate mapping, fill modes and
    interpolation with gathers: the forward pass matches the op, it compiles under
    `jit_compile=True`, and the gradient (a scatter-add) is the exact transpose.

    Args:
        images: float [B, H, W, C] with static H, W, C.
        transforms: float32 [B, 8] (or [8]) rows `[a0, a1, a2, b0, b1, b2, c0, c1]`
            mapping each *output* pixel (x, y) to the *input* point
            `((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k)`, `k = c0 x + c1 y + 1`.
        fill_mode: 'constant', 'nearest', 'reflect' or 'wrap', as the TF op.
        fill_value: value outside the image for 'constant' (and degenerate `k = 0`).
        interpolation: 'bilinear' or 'nearest'.

    Returns:
        [B, H, W, C] with the dtype of `images`.
    """
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(
            f"`interpolation` must be 'bilinear' or 'nearest'; received {interpolation!r}."
        )
    images = tf.convert_to_tensor(images)
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    if None in (height, width, channels):
        raise ValueError(
            f"`images` must have static height, width and channels; received {images.shape}."
        )
    transforms = tf.cast(transforms, tf.float32)
    if transforms.shape.rank == 1:
        transforms = transforms[None, :]
    output_y, output_x = tf.meshgrid(
        tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32), indexing="ij"
    )
    output_y = tf.reshape(output_y, [1, height * width])
    output_x = tf.reshape(output_x, [1, height * width])
    a0, a1, a2, b0, b1, b2, c0, c1 = [transforms[:, i : i + 1] for i in range(8)]
    projection = c0 * output_x + c1 * output_y + 1.0
    degenerate = tf.equal(projection, 0.0)
    projection = tf.where(degenerate, tf.ones_like(projection), projection)
    input_x = _map_coordinates(
        (a0 * output_x + a1 * output_y + a2) / projection, width, fill_mode
    )
    input_y = _map_coordinates(
        (b0 * output_x + b1 * output_y + b2) / projection, height, fill_mode
    )
    # Neighbours [B, K, H*W] (K = 4 for bilinear, 1 for nearest) and their weights.
    if interpolation == "nearest":
        # std::round rounds halves away from zero; tf.round would round them to even.
        neighbour_y = (tf.sign(input_y) * tf.floor(tf.abs(input_y) + 0.5))[:, None]
        neighbour_x = (tf.sign(input_x) * tf.floor(tf.abs(input_x) + 0.5))[:, None]
        weights = tf.ones_like(neighbour_y)
    else:
        y_floor = tf.floor(input_y)
        x_floor = tf.floor(input_x)
        neighbour_y = tf.stack([y_floor, y_floor, y_floor + 1.0, y_floor + 1.0], axis=1)
        neighbour_x = tf.stack([x_floor, x_floor + 1.0, x_floor, x_floor + 1.0], axis=1)
        # The kernel's weights: (ceil - v) for the floor neighbour, (v - floor) for ceil.
        weight_y = tf.stack(
            [y_floor + 1.0 - input_y] * 2 + [input_y - y_floor] * 2, axis=1
        )
        weight_x = tf.stack(
            [x_floor + 1.0 - input_x, input_x - x_floor] * 2, axis=1
        )
        weights = weight_y * weight_x
    inside = (
        (neighbour_y >= 0.0)
        & (neighbour_y <= height - 1.0)
        & (neighbour_x >= 0.0)
        & (neighbour_x <= width - 1.0)
        & ~degenerate[:, None]
    )
    inside_weights = tf.where(inside, weights, 0.0)
    # One plain gather from the flattened batch is much faster than four batched ones.
    index = tf.cast(
        tf.clip_by_value(neighbour_y, 0.0, height - 1.0) * width
        + tf.clip_by_value(neighbour_x, 0.0, width - 1.0),
        tf.int32,
    ) + (tf.range(tf.shape(images)[0]) * (height * width))[:, None, None]
    values = tf.gather(tf.reshape(images, [-1, channels]), index)
    outputs = tf.reduce_sum(tf.cast(inside_weights, images.dtype)[..., None] * values, axis=1)
    if not (isinstance(fill_value, numbers.Real) and fill_value == 0.0):
        # Neighbours outside the image (and degenerate points) read `fill_value`.
        fill_weight = tf.where(
            degenerate, 1.0, tf.reduce_sum(weights - inside_weights, axis=1)
        )
        outputs += tf.cast(fill_weight, images.dtype)[..., None] * tf.cast(
            fill_value, images.dtype
        )
    return tf.reshape(outputs, [-1, height, width, channels])


# Per-layer projective matrices, the same ones the layers pass to
# ImageProjectiveTransformV3 (keras_cv/src/utils/preprocessing.py and the layer files),
# so `projective_transform` reproduces the layers' own augment_images under XLA. Each
# returns the list of warps applied in sequence; images are [B, H, W, C].
def _rotation_matrices(transformation, height, width):
    angles = tf.cast(transformation["angles"], tf.float32)
    cosines, sines = tf.cos(angles), tf.sin(angles)
    x_offset = ((width - 1.0) - (cosines * (width - 1.0) - sines * (height - 1.0))) / 2.0
    y_offset = ((height - 1.0) - (sines * (width - 1.0) + cosines * (height - 1.0))) / 2.0
    zeros = tf.zeros_like(angles)
    return [
        tf.stack([cosines, -sines, x_offset, sines, cosines, y_offset, zeros, zeros], axis=1)
    ]


def _zoom_matrices(transformation, height, width):
    zoom_x = tf.cast(transformation["width_zooms"][:, 0], tf.float32)
    zoom_y = tf.cast(transformation["height_zooms"][:, 0], tf.float32)
    x_offset = ((width - 1.0) / 2.0) * (1.0 - zoom_x)
    y_offset = ((height - 1.0) / 2.0) * (1.0 - zoom_y)
    zeros = tf.zeros_like(zoom_x)
    return [tf.stack([zoom_x, zeros, x_offset, zeros, zoom_y, y_offset, zeros, zeros], axis=1)]


def _translation_matrices(transformation, height, width):
    shift_x = tf.cast(transformation["width_translations"][:, 0], tf.float32) * width
    shift_y = tf.cast(transformation["height_translations"][:, 0], tf.float32) * height
    ones, zeros = tf.ones_like(shift_x), tf.zeros_like(shift_x)
    return [tf.stack([ones, zeros, -shift_x, zeros, ones, -shift_y, zeros, zeros], axis=1)]


def _shear_matrices(transformation, height, width):
    del height, width  # Unused: shears are in pixels per pixel.
    matrices = []
    # keras-cv shears x then y, as two separate warps; None means the axis is off.
    for key, position in (("shear_x", 1), ("shear_y", 3)):
        shear = transformation[key]
        if shear is None:
            continue
        shear = tf.cast(shear[:, 0], tf.float32)
        rows = [tf.ones_like(shear) if i in (0, 4) else tf.zeros_like(shear) for i in range(8)]
        rows[position] = shear
        matrices.append(tf.stack(rows, axis=1))
    return matrices


def _keras_rotation_matrices(transformation, height, width):
    del height, width  # Unused: Keras samples the matrix itself.
    return [tf.cast(transformation["rotation_matrix"], tf.float32)]


# Exact types: a subclass may change augment_images, so it takes the generic path.
_PROJECTIVE_MATRICES = {
    keras_cv.layers.RandomRotation: _rotation_matrices,
    keras_cv.layers.RandomZoom: _zoom_matrices,
    keras_cv.layers.RandomTranslation: _translation_matrices,
    keras_cv.layers.RandomShear: _shear_matrices,
    keras.layers.RandomRotation: _keras_rotation_matrices,
}
# Geometric layers whose own sampling and application compile under XLA. Other
# geometric layers warp with ImageProjectiveTransformV3, which has no XLA kernel.
_XLA_NATIVE_GEOMETRIC_TYPES = (keras_cv.layers.RandomFlip, keras.layers.RandomFlip)


def _is_xla_compatible(layer):
    return type(layer) in _PROJECTIVE_MATRICES or type(layer) in _XLA_NATIVE_GEOMETRIC_TYPES


def _global_batch_position(batch_size):
    """(replicas in sync, row of this replica's first example in the global batch).

    Under a tf.distribute strategy the global batch is the replicas' batches in
    replica order, as the strategy splits it; (1, 0) outside one.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return 1, 0
    replica_id = tf.cast(context.replica_id_in_sync_group, tf.int32)
    return context.num_replicas_in_sync, replica_id * tf.cast(batch_size, tf.int32)


def _replica_rows(transformation, first_row, batch_size, replicas):
    """This replica's rows of a geometric layer's global-batch transformation.

    The sampled tensors of rank >= 1 hold one row per example of the global
    batch and are sliced (unless their static first dimension says otherwise);
    scalars and Python values (Keras's image shapes) are kept, and a Keras
    `batch_size` entry becomes the replica's batch size.
    """
    if replicas == 1:
        return transformation
    static_batch = tf.get_static_value(batch_size)
    global_batch = None if static_batch is None else int(static_batch) * replicas

    def rows(value):
        if not (tf.is_tensor(value) and value.shape.rank):
            return value
        if global_batch is not None and value.shape[0] not in (None, global_batch):
            return value
        return value[first_row : first_row + batch_size]

    if isinstance(transformation, dict) and "batch_size" in transformation:
        transformation = dict(transformation, batch_size=batch_size)
    return tf.nest.map_structure(rows, transformation)


def _snap_to_one(fraction):
    return tf.where(fraction >= 1.0 - _FIT_TOLERANCE, tf.ones_like(fraction), fraction)


def _is_keras_cv_layer(layer):
    return isinstance(layer, keras_cv.layers.VectorizedBaseImageAugmentationLayer)


def _is_keras_image_layer(layer):
    return callable(getattr(layer, "get_random_transformation", None)) and callable(
        getattr(layer, "transform_images", None)
    )


def _describe(layer):
    return f"{type(layer).__name__} '{getattr(layer, 'name', '?')}'"


def _heatmap_variant(layer):
    """The layer with bilinear interpolation and a constant 0 fill, for heatmaps.

    keras-cv and Keras read `fill_mode`, `fill_value` and `interpolation` from the layer
    when they warp, and images usually use 'reflect' fill. A heatmap must not invent mass
    outside the original view, so we warp heatmaps with a shallow copy carrying the
    heatmap settings, leaving the user's layer untouched. object.__setattr__ bypasses
    Keras attribute tracking, which would otherwise track the copy's state.
    """
    settings = {"fill_mode": "constant", "fill_value": 0.0, "interpolation": "bilinear"}
    if all(getattr(layer, key, value) == value for key, value in settings.items()):
        return layer
    variant = copy.copy(layer)
    for key, value in settings.items():
        if hasattr(layer, key):
            object.__setattr__(variant, key, value)
    return variant


def _check_range(argument, value, allowed, lower_bound, upper_bound):
    message = f"`{argument}` must be {allowed}; received {value!r}."
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(message)
    if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in value):
        raise ValueError(message)
    low, high = float(value[0]), float(value[1])
    if not (low > lower_bound and low <= high and high <= upper_bound):
        raise ValueError(message)
    return low, high


def _check_layers(argument, layers, geometric):
    if isinstance(layers, keras.layers.Layer) or not isinstance(layers, (tuple, list)):
        raise ValueError(
            f"`{argument}` must be a list or tuple of layers; received {layers!r}."
        )
    for index, layer in enumerate(layers):
        if not isinstance(layer, keras.layers.Layer):
            raise ValueError(
                f"`{argument}[{index}]` must be a keras or keras-cv layer; received "
                f"{layer!r} of type {type(layer).__name__}."
            )
        if geometric and not (_is_keras_cv_layer(layer) or _is_keras_image_layer(layer)):
            raise ValueError(
                f"`{argument}[{index}]` ({_describe(layer)}) cannot be applied with one "
                "shared transform to images and heatmaps. Allowed: keras-cv vectorized "
                "augmentation layers (get_random_transformation_batch/augment_images, "
                "e.g. keras_cv.layers.RandomRotation, RandomZoom, RandomTranslation, "
                "RandomShear, RandomFlip) or Keras image preprocessing layers "
                "(get_random_transformation/transform_images, e.g. "
                "keras.layers.RandomRotation)."
            )
        if geometric and getattr(layer, "data_format", "channels_last") != "channels_last":
            raise ValueError(
                f"`{argument}[{index}]` ({_describe(layer)}) has data_format="
                f"{layer.data_format!r}; images and heatmaps here are channels_last, so "
                "build the layer with data_format='channels_last'."
            )
        if not geometric and isinstance(layer, _GEOMETRIC_LAYER_CLASSES):
            raise ValueError(
                f"`{argument}[{index}]` ({_describe(layer)}) moves pixels; applied to "
                "images only it would break the image/heatmap pairing. Pass it in "
                "`geometric_layers` instead."
            )
    return list(layers)


@keras.saving.register_keras_serializable(package="cgc_tf")
class PairedAugmentation(keras.layers.Layer):
    """Samples one geometric transform T per example; applies it to images and heatmaps.

    T = random resized crop -> bilinear resize to the input size -> horizontal flip with
    probability `flip_probability` -> each of `geometric_layers` in order. Images then go
    through `photometric_layers`; heatmaps do not.

    Usage in a CGC step:

    ```python
    transform = augmentation.sample(batch_size, height, width)
    x_aug = augmentation.apply_to_images(x_orig, transform)
    ...
    warped = augmentation.apply_to_heatmaps(cam_orig, transform)  # differentiable
    ```

    `transform` is a dict of tensors: `"boxes"` float32 [B, 4] (normalised
    `[y1, x1, y2, x2]`, tf.image.crop_and_resize convention; with
    `crop_mode="torchvision"`, `"crops"` int32 [B, 4] pixel (top, left, height, width)
    instead), `"flips"` bool [B], and
    `"layer_transformations"`, a tuple with the transformation sampled by each geometric
    layer (the layer's own nest; keras-cv's RandomShear puts None in it for an unused
    axis, Keras layers may add Python ints for shapes).

    Randomness: the crop and flip use `keras.random` with a `SeedGenerator(seed)`, so
    `keras.utils.set_random_seed` before building the layer makes them reproducible. Keras
    geometric layers draw from the same SeedGenerator. keras-cv layers draw from their
    own `tf.random.Generator` (TF's global generator unless the keras-cv layer got a
    `seed`), which `keras.utils.set_random_seed` does not reset.

    XLA: the crop and flip compile under `jit_compile=True`, and so do these geometric
    layers: keras-cv RandomFlip, RandomRotation, RandomZoom, RandomTranslation,
    RandomShear and Keras RandomFlip, RandomRotation (the warping ones are applied with
    `projective_transform`, whose gradient is exact). Any other geometric layer runs its
    own code, usually ImageProjectiveTransformV3, which has no XLA kernel and an
    approximate gradient; see `xla_compatible` and `require_xla_compatible()`.

    Args:
        area_range: (min, max) fraction of the image area covered by the crop box,
            0 < min <= max <= 1. (1, 1) disables cropping.
        aspect_ratio_range: (min, max) width / height of the crop box in pixels,
            0 < min <= max; sampled log-uniformly.
        flip_probability: probability of a horizontal flip, in [0, 1].
        geometric_layers: keras-cv vectorized augmentation layers (e.g.
            `keras_cv.layers.RandomRotation`) or Keras image preprocessing layers (e.g.
            `keras.layers.RandomRotation`), applied after the crop and flip with the same
            per-example parameters to images and heatmaps. Heatmaps are always warped
            with bilinear interpolation and a constant 0 fill, whatever the layer's
            `fill_mode` (images keep the layer's own settings).
        photometric_layers: Keras or keras-cv layers applied to images only, after the
            geometric part, as `layer(images, training=True)` (e.g.
            `keras_cv.layers.RandomColorJitter`, `keras.layers.RandomContrast`).
        seed: optional int seed of the SeedGenerator.
        crop_mode: "continuous" (sub-pixel boxes, `"boxes"` in the transform, resampled
            as tf.image.crop_and_resize by `crop_flip_resize`) or "torchvision" (the
            reference's T: integer crops drawn as torchvision's
            RandomResizedCrop.get_params, `"crops"` (i, j, h, w) in the transform,
            resampled as torch's F.interpolate(bilinear, align_corners=False) by
            `resized_crop`).
        name: layer name.
        dtype: layer dtype policy.
    """

    def __init__(
        self,
        area_range=(0.08, 1.0),
        aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
        flip_probability=0.5,
        geometric_layers=(),
        photometric_layers=(),
        seed=None,
        crop_mode="continuous",
        name=None,
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        if crop_mode not in CROP_MODES:
            raise ValueError(f"`crop_mode` must be one of {CROP_MODES}; received {crop_mode!r}.")
        self.crop_mode = crop_mode
        self.area_range = _check_range(
            "area_range",
            area_range,
            "two numbers (min, max) with 0 < min <= max <= 1 (fractions of the image "
            "area)",
            0.0,
            1.0,
        )
        self.aspect_ratio_range = _check_range(
            "aspect_ratio_range",
            aspect_ratio_range,
            "two finite numbers (min, max) with 0 < min <= max (width / height)",
            0.0,
            math.inf,
        )
        if (
            not isinstance(flip_probability, numbers.Real)
            or not 0.0 <= flip_probability <= 1.0
        ):
            raise ValueError(
                "`flip_probability` must be a number in [0, 1]; received "
                f"{flip_probability!r}."
            )
        self.flip_probability = float(flip_probability)
        if seed is not None and (
            not isinstance(seed, numbers.Integral) or isinstance(seed, bool)
        ):
            raise ValueError(f"`seed` must be None or an int; received {seed!r}.")
        self.seed = seed
        self.geometric_layers = _check_layers("geometric_layers", geometric_layers, True)
        self.photometric_layers = _check_layers(
            "photometric_layers", photometric_layers, False
        )
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.built = True

    @property
    def xla_compatible(self):
        """False if a geometric layer has no XLA path (ImageProjectiveTransformV3)."""
        return not self._xla_incompatible_layers()

    def _xla_incompatible_layers(self):
        return [layer for layer in self.geometric_layers if not _is_xla_compatible(layer)]

    def require_xla_compatible(self):
        """Raises ValueError naming the layers that cannot compile with XLA, if any."""
        offending = self._xla_incompatible_layers()
        if offending:
            names = ", ".join(_describe(layer) for layer in offending)
            raise ValueError(
                f"PairedAugmentation '{self.name}' cannot run under XLA "
                f"(jit_compile=True): geometric_layers {names} have no XLA path (they "
                "warp with ImageProjectiveTransformV3, which has no XLA kernel). Compile "
                "with jit_compile=False, or use only layers with an XLA path: keras-cv "
                "RandomFlip, RandomRotation, RandomZoom, RandomTranslation, RandomShear; "
                "Keras RandomFlip, RandomRotation."
            )

    @_no_autograph
    def sample(self, batch_size, image_height, image_width):
        """Draws one transform per example.

        Args:
            batch_size: int or int32 scalar tensor B.
            image_height: int or int32 scalar tensor, height of the images to transform.
            image_width: int or int32 scalar tensor, width of the images to transform.

        Returns:
            dict with `"boxes"` float32 [B, 4] (crop_mode "continuous") or `"crops"`
            int32 [B, 4] (crop_mode "torchvision"), `"flips"` bool [B] and
            `"layer_transformations"` (tuple, one entry per geometric layer).
        """
        height = tf.cast(image_height, tf.float32)
        width = tf.cast(image_width, tf.float32)
        count = _NUM_CROP_CANDIDATES
        replicas, first_row = _global_batch_position(batch_size)
        # One draw for the global batch: count areas, count log-ratios, two box
        # offsets, one flip coin per example. Every replica draws the same rows
        # (its seed state is an identical copy) and keeps its own.
        uniforms = keras.random.uniform(
            (batch_size * replicas, 2 * count + 3), seed=self.seed_generator
        )
        if replicas > 1:
            uniforms = uniforms[first_row : first_row + batch_size]
        if self.crop_mode == "torchvision":
            geometry = {"crops": self._torchvision_crops(uniforms, image_height, image_width)}
        else:
            geometry = {"boxes": self._continuous_boxes(uniforms, height, width)}
        flips = uniforms[:, 2 * count + 2] < self.flip_probability
        layer_transformations = ()
        if self.geometric_layers:
            # Some layers read the image shape from `images`; this zero-size-channel
            # stand-in carries the shape without costing memory.
            shape_carrier = tf.zeros([batch_size * replicas, image_height, image_width, 0])
            layer_transformations = tuple(
                _replica_rows(
                    self._sample_layer(layer, batch_size * replicas, shape_carrier),
                    first_row,
                    batch_size,
                    replicas,
                )
                for layer in self.geometric_layers
            )
        return {**geometry, "flips": flips, "layer_transformations": layer_transformations}

    def _torchvision_crops(self, uniforms, image_height, image_width):
        """torchvision's RandomResizedCrop.get_params per row: int32 [B, 4] (i, j, h, w).

        Ten (area, log-ratio) candidates, sides rounded half to even as Python's
        round(), the first that fits, a uniform integer offset; else the central
        crop with the ratio clipped into the range.
        """
        count = _NUM_CROP_CANDIDATES
        height = tf.cast(image_height, tf.float32)
        width = tf.cast(image_width, tf.float32)
        minimum_area, maximum_area = self.area_range
        area = height * width * (
            minimum_area + (maximum_area - minimum_area) * uniforms[:, :count]
        )
        log_minimum = math.log(self.aspect_ratio_range[0])
        log_maximum = math.log(self.aspect_ratio_range[1])
        ratio = tf.exp(
            log_minimum + (log_maximum - log_minimum) * uniforms[:, count : 2 * count]
        )
        crop_width = tf.round(tf.sqrt(area * ratio))
        crop_height = tf.round(tf.sqrt(area / ratio))
        fits = (crop_width > 0) & (crop_width <= width) & (crop_height > 0) & (
            crop_height <= height
        )
        candidate = tf.reduce_min(tf.where(fits, tf.range(count)[None, :], count), axis=1)
        choice = tf.one_hot(candidate, count, dtype=tf.float32)
        found = tf.reduce_any(fits, axis=1)
        image_ratio = width / height
        fallback_width = tf.where(
            image_ratio > self.aspect_ratio_range[1],
            tf.round(height * self.aspect_ratio_range[1]),
            width,
        )
        fallback_height = tf.where(
            image_ratio < self.aspect_ratio_range[0],
            tf.round(width / self.aspect_ratio_range[0]),
            height,
        )
        crop_height = tf.where(found, tf.reduce_sum(crop_height * choice, axis=1), fallback_height)
        crop_width = tf.where(found, tf.reduce_sum(crop_width * choice, axis=1), fallback_width)
        # torch.randint(0, side - crop + 1); the central offset when falling back.
        offsets = uniforms[:, 2 * count : 2 * count + 2]
        top = tf.where(
            found,
            tf.minimum(tf.floor(offsets[:, 0] * (height - crop_height + 1.0)), height - crop_height),
            tf.floor((height - crop_height) / 2.0),
        )
        left = tf.where(
            found,
            tf.minimum(tf.floor(offsets[:, 1] * (width - crop_width + 1.0)), width - crop_width),
            tf.floor((width - crop_width) / 2.0),
        )
        return tf.cast(tf.stack([top, left, crop_height, crop_width], axis=1), tf.int32)

    def _continuous_boxes(self, uniforms, height, width):
        """Sub-pixel boxes, float32 [B, 4] in the crop_and_resize convention."""
        count = _NUM_CROP_CANDIDATES
        minimum_area, maximum_area = self.area_range
        area = minimum_area + (maximum_area - minimum_area) * uniforms[:, :count]
        log_minimum = math.log(self.aspect_ratio_range[0])
        log_maximum = math.log(self.aspect_ratio_range[1])
        ratio = tf.exp(
            log_minimum + (log_maximum - log_minimum) * uniforms[:, count : 2 * count]
        )
        # Box sides as fractions of the image sides, from area = h * w (fractions) and
        # ratio = (w * width) / (h * height) (pixels).
        width_fraction = tf.sqrt(area * ratio * height / width)
        height_fraction = tf.sqrt(area / ratio * width / height)
        # A side that should be exactly the image side (area 1 with the image's own
        # ratio) comes out of exp(log(ratio)) a rounding error above or below 1: accept
        # and snap it, so such boxes are exactly [0, 1] instead of a fallback or a
        # sub-pixel shift.
        fits = tf.logical_and(
            width_fraction <= 1.0 + _FIT_TOLERANCE, height_fraction <= 1.0 + _FIT_TOLERANCE
        )
        width_fraction = _snap_to_one(width_fraction)
        height_fraction = _snap_to_one(height_fraction)
        # The first candidate that fits (argmax does not guarantee the first on ties).
        candidate = tf.reduce_min(
            tf.where(fits, tf.range(count)[None, :], count), axis=1
        )
        choice = tf.one_hot(candidate, count, dtype=tf.float32)
        found = tf.reduce_any(fits, axis=1)
        # torchvision's fallback: the largest central crop whose ratio is clipped into
        # the range (the whole image when its own ratio is in range).
        image_ratio = width / height
        fallback_height = tf.minimum(1.0, image_ratio / self.aspect_ratio_range[0])
        fallback_width = tf.minimum(1.0, self.aspect_ratio_range[1] / image_ratio)
        box_height = tf.where(
            found, tf.reduce_sum(height_fraction * choice, axis=1), fallback_height
        )
        box_width = tf.where(
            found, tf.reduce_sum(width_fraction * choice, axis=1), fallback_width
        )
        offsets = tf.where(found[:, None], uniforms[:, 2 * count : 2 * count + 2], 0.5)
        top = offsets[:, 0] * (1.0 - box_height)
        left = offsets[:, 1] * (1.0 - box_width)
        boxes = tf.stack(
            [
                top,
                left,
                tf.minimum(top + box_height, 1.0),
                tf.minimum(left + box_width, 1.0),
            ],
            axis=1,
        )
        return boxes

    def _sample_layer(self, layer, batch_size, shape_carrier):
        if _is_keras_cv_layer(layer):
            return layer.get_random_transformation_batch(batch_size, images=shape_carrier)
        return layer.get_random_transformation(
            shape_carrier, training=True, seed=self.seed_generator
        )

    @staticmethod
    def _apply_layer(layer, images, transformation, heatmaps):
        matrices = _PROJECTIVE_MATRICES.get(type(layer))
        if matrices is not None:
            if heatmaps:
                settings = ("constant", 0.0, "bilinear")
            else:
                settings = (layer.fill_mode, layer.fill_value, layer.interpolation)
            height, width = float(images.shape[1]), float(images.shape[2])
            for matrix in matrices(transformation, height, width):
                images = projective_transform(images, matrix, *settings)
            return images
        if heatmaps:
            layer = _heatmap_variant(layer)
        if _is_keras_cv_layer(layer):
            return layer.augment_images(images, transformations=transformation)
        return layer.transform_images(images, transformation, training=True)

    def _check_transform(self, transform):
        geometry = "crops" if self.crop_mode == "torchvision" else "boxes"
        if not isinstance(transform, dict) or not {geometry, "flips"} <= set(transform):
            raise ValueError(
                f"`transform` must be the dict returned by `sample()` (keys '{geometry}', "
                f"'flips', 'layer_transformations'); received {transform!r}."
            )
        transformations = tuple(transform.get("layer_transformations", ()))
        if len(transformations) != len(self.geometric_layers):
            raise ValueError(
                f"`transform['layer_transformations']` has {len(transformations)} "
                f"entries but this PairedAugmentation has {len(self.geometric_layers)} "
                "geometric layers; pass the dict returned by this layer's `sample()`."
            )
        return transformations

    @_no_autograph
    def _apply_geometric(self, inputs, transform, heatmaps):
        transformations = self._check_transform(transform)
        height = inputs.shape[1]
        width = inputs.shape[2]
        if height is None or width is None:
            raise ValueError(
                "The spatial size of the inputs must be known statically (it sets the "
                f"output size); received shape {inputs.shape}."
            )
        if self.crop_mode == "torchvision":
            outputs = resized_crop(
                inputs, transform["crops"], transform["flips"], (height, width)
            )
        else:
            outputs = crop_flip_resize(
                inputs, transform["boxes"], transform["flips"], (height, width)
            )
        for layer, transformation in zip(self.geometric_layers, transformations):
            outputs = self._apply_layer(layer, outputs, transformation, heatmaps)
        return outputs

    def apply_to_images(self, images, transform):
        """Applies the geometric transform, then the photometric layers, to images.

        Args:
            images: float [B, H, W, C] (integer images are cast to float32).
            transform: the dict returned by `sample(B, H, W)`.

        Returns:
            float [B, H, W, C], same spatial size as the input.
        """
        images = tf.convert_to_tensor(images)
        if images.shape.rank != 4:
            raise ValueError(
                f"`images` must have rank 4 [B, H, W, C]; received shape {images.shape}."
            )
        outputs = self._apply_geometric(images, transform, heatmaps=False)
        for layer in self.photometric_layers:
            outputs = layer(outputs, training=True)
        return outputs

    def apply_to_heatmaps(self, heatmaps, transform):
        """Applies the geometric transform only, differentiably, to heatmaps.

        Bilinear interpolation and a constant 0 fill everywhere (also inside the
        user's geometric layers).

        Args:
            heatmaps: float [B, H, W] or [B, H, W, C] (typically C = 1).
            transform: the dict returned by `sample(B, H, W)`.

        Returns:
            The warped heatmaps, with the rank and shape of `heatmaps`.
        """
        heatmaps = tf.convert_to_tensor(heatmaps)
        rank = heatmaps.shape.rank
        if rank not in (3, 4):
            raise ValueError(
                "`heatmaps` must have shape [B, H, W] or [B, H, W, C]; received shape "
                f"{heatmaps.shape}."
            )
        if rank == 3:
            heatmaps = heatmaps[..., None]
        outputs = self._apply_geometric(heatmaps, transform, heatmaps=True)
        return outputs[..., 0] if rank == 3 else outputs

    def call(self, images, training=True):
        """A random view: `apply_to_images(images, sample(...))`; identity if not training."""
        if not training:
            return images
        images = tf.convert_to_tensor(images)
        transform = self.sample(*(_static_or_dynamic(images, axis) for axis in range(3)))
        return self.apply_to_images(images, transform)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        # Not a constructor argument: the layer has no weights.
        config.pop("trainable", None)
        config.update(
            {
                "area_range": self.area_range,
                "aspect_ratio_range": self.aspect_ratio_range,
                "flip_probability": self.flip_probability,
                "geometric_layers": [
                    keras.saving.serialize_keras_object(layer)
                    for layer in self.geometric_layers
                ],
                "photometric_layers": [
                    keras.saving.serialize_keras_object(layer)
                    for layer in self.photometric_layers
                ],
                "seed": self.seed,
                "crop_mode": self.crop_mode,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("geometric_layers", "photometric_layers"):
            config[key] = [
                keras.saving.deserialize_keras_object(layer_config)
                for layer_config in config.get(key, ())
            ]
        return cls(**config)


def check_xla_compatible(augmentation):
    """Raises ValueError if `augmentation` (a PairedAugmentation) cannot run under XLA."""
    if not isinstance(augmentation, PairedAugmentation):
        raise ValueError(
            "`augmentation` must be a cgc_tf PairedAugmentation; received "
            f"{type(augmentation).__name__}."
        )
    augmentation.require_xla_compatible()
