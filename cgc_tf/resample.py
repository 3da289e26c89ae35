"""Resampling kernels and crop geometry of the paired transform T (tf only).

What: bilinear crop + resize + flip (`crop_flip_resize`, tf.image.crop_and_resize's
sampling; `resized_crop`, torch's F.interpolate of a crop), the projective warp of
ImageProjectiveTransformV3 (`projective_transform`) and the matrices keras-cv and
Keras layers warp with, and the crop parameters T draws (`torchvision_crops`,
`continuous_boxes`). Why: the TF ops have no XLA kernel (and the projective op an
inexact gradient); these are batched gathers, linear in the input, so heatmaps warp
differentiably with the exact transpose as gradient. Images are [B, H, W, C]. See
docs/augmentation.md.
"""

import math
import numbers

import tensorflow as tf

# torchvision's RandomResizedCrop tries 10 (area, ratio) candidates before falling back.
CROP_CANDIDATES = 10
# Sampling coordinates this close (in pixels) outside the image count as on its border.
# Float rounding can put the last sample of a box whose edge is exactly 1.0 a hair past
# the last pixel, where tf.image.crop_and_resize would output a whole row of zeros.
_BORDER_TOLERANCE = 1e-3
# Slack on a box side (as a fraction of the image side) when testing that it fits.
_FIT_TOLERANCE = 1e-6

# The code has no tensor-dependent Python control flow. Skipping AutoGraph's source
# conversion cuts tf.function tracing time.
_no_autograph = tf.autograph.experimental.do_not_convert


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
def _float_images(images):
    """`images` as a float tensor [B, H, W, C] (integer images cast to float32)."""
    images = tf.convert_to_tensor(images)
    if not images.dtype.is_floating:
        images = tf.cast(images, tf.float32)
    if images.shape.rank != 4:
        raise ValueError(
            f"`images` must have rank 4 [B, H, W, C]; received shape {images.shape}."
        )
    return images


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
    images = _float_images(images)
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
    images = _float_images(images)
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
# takes a layer's sampled transformation (its own dict) and the image height and width
# (Python floats) and returns the list of float32 [B, 8] warps applied in sequence.
def rotation_matrices(transformation, height, width):
    """keras_cv.layers.RandomRotation's warp."""
    angles = tf.cast(transformation["angles"], tf.float32)
    cosines, sines = tf.cos(angles), tf.sin(angles)
    x_offset = ((width - 1.0) - (cosines * (width - 1.0) - sines * (height - 1.0))) / 2.0
    y_offset = ((height - 1.0) - (sines * (width - 1.0) + cosines * (height - 1.0))) / 2.0
    zeros = tf.zeros_like(angles)
    return [
        tf.stack([cosines, -sines, x_offset, sines, cosines, y_offset, zeros, zeros], axis=1)
    ]


def zoom_matrices(transformation, height, width):
    """keras_cv.layers.RandomZoom's warp."""
    zoom_x = tf.cast(transformation["width_zooms"][:, 0], tf.float32)
    zoom_y = tf.cast(transformation["height_zooms"][:, 0], tf.float32)
    x_offset = ((width - 1.0) / 2.0) * (1.0 - zoom_x)
    y_offset = ((height - 1.0) / 2.0) * (1.0 - zoom_y)
    zeros = tf.zeros_like(zoom_x)
    return [tf.stack([zoom_x, zeros, x_offset, zeros, zoom_y, y_offset, zeros, zeros], axis=1)]


def translation_matrices(transformation, height, width):
    """keras_cv.layers.RandomTranslation's warp."""
    shift_x = tf.cast(transformation["width_translations"][:, 0], tf.float32) * width
    shift_y = tf.cast(transformation["height_translations"][:, 0], tf.float32) * height
    ones, zeros = tf.ones_like(shift_x), tf.zeros_like(shift_x)
    return [tf.stack([ones, zeros, -shift_x, zeros, ones, -shift_y, zeros, zeros], axis=1)]


def shear_matrices(transformation, height, width):
    """keras_cv.layers.RandomShear's warps (x, then y)."""
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


def keras_rotation_matrices(transformation, height, width):
    """keras.layers.RandomRotation's warp."""
    del height, width  # Unused: Keras samples the matrix itself.
    return [tf.cast(transformation["rotation_matrix"], tf.float32)]


def torchvision_crops(uniforms, image_height, image_width, area_range, aspect_ratio_range):
    """torchvision's RandomResizedCrop.get_params per row.

    Ten (area, log-ratio) candidates, sides rounded half to even as Python's
    round(), the first that fits, a uniform integer offset; else the central
    crop with the ratio clipped into the range.

    Args:
        uniforms: float32 [B, >= 2 * CROP_CANDIDATES + 2] in [0, 1): the candidates'
            areas, then their log-ratios, then the two offsets.
        image_height, image_width: int or int32 scalar tensors.
        area_range: (min, max) fractions of the image area.
        aspect_ratio_range: (min, max) width / height in pixels.

    Returns:
        int32 [B, 4] pixel crops (top, left, height, width).
    """
    count = CROP_CANDIDATES
    height = tf.cast(image_height, tf.float32)
    width = tf.cast(image_width, tf.float32)
    minimum_area, maximum_area = area_range
    area = height * width * (
        minimum_area + (maximum_area - minimum_area) * uniforms[:, :count]
    )
    log_minimum = math.log(aspect_ratio_range[0])
    log_maximum = math.log(aspect_ratio_range[1])
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
        image_ratio > aspect_ratio_range[1],
        tf.round(height * aspect_ratio_range[1]),
        width,
    )
    fallback_height = tf.where(
        image_ratio < aspect_ratio_range[0],
        tf.round(width / aspect_ratio_range[0]),
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


def continuous_boxes(uniforms, height, width, area_range, aspect_ratio_range):
    """Sub-pixel crop boxes drawn as torchvision's RandomResizedCrop, without rounding.

    Args:
        uniforms: as `torchvision_crops`.
        height, width: float32 scalars, the image size.
        area_range, aspect_ratio_range: as `torchvision_crops`.

    Returns:
        float32 [B, 4] normalised [y1, x1, y2, x2] (tf.image.crop_and_resize's convention).
    """
    count = CROP_CANDIDATES
    minimum_area, maximum_area = area_range
    area = minimum_area + (maximum_area - minimum_area) * uniforms[:, :count]
    log_minimum = math.log(aspect_ratio_range[0])
    log_maximum = math.log(aspect_ratio_range[1])
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
    fallback_height = tf.minimum(1.0, image_ratio / aspect_ratio_range[0])
    fallback_width = tf.minimum(1.0, aspect_ratio_range[1] / image_ratio)
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


def _snap_to_one(fraction):
    return tf.where(fraction >= 1.0 - _FIT_TOLERANCE, tf.ones_like(fraction), fraction)
