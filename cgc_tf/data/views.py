"""The views of docs/method.md computed in tf.data, one example at a time.

Deterministic view `x_orig`: resize the short side to round(S * 256 / 224), then
centre crop S x S (boxes follow). Classification view `x_xe`: random resized crop
(area [0.08, 1], aspect [3/4, 4/3]) to S x S and a random horizontal flip. T is
sampled by the model, not here. Why `tf.image` rather than `cgc_tf.resample`:
docs/data.md (views).
"""

import math

import tensorflow as tf

RESIZE_RATIO = 256 / 224
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
FLIP_PROBABILITY = 0.5
# tf.image.sample_distorted_bounding_box's attempts before it falls back to the
# whole image (torchvision's RandomResizedCrop also tries 10 times).
_CROP_ATTEMPTS = 10


def resize_side(image_size):
    """Short side (pixels, int) of the deterministic view before its centre crop."""
    return int(round(image_size * RESIZE_RATIO))


def min_decoded_side(image_size, classification_view):
    """Smallest decoded short side that loses no resolution in the views.

    The deterministic view needs `resize_side(S)` pixels; the smallest random crop
    (area fraction 0.08) needs about S / sqrt(0.08) pixels of short side to give
    S pixels without upscaling. Decoding may downscale JPEGs down to this size.

    Args:
      image_size: int S.
      classification_view: bool, whether the classification view is computed.

    Returns:
      int.
    """
    side = resize_side(image_size)
    if classification_view:
        side = max(side, int(math.ceil(image_size / math.sqrt(CROP_AREA_RANGE[0]))))
    return side


def _centre_crop_geometry(height, width, image_size):
    """(resized_height, resized_width, top, left) of the deterministic view; int32."""
    height = tf.cast(height, tf.float32)
    width = tf.cast(width, tf.float32)
    scale = resize_side(image_size) / tf.minimum(height, width)
    resized_height = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), image_size)
    resized_width = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), image_size)
    top = (resized_height - image_size) // 2
    left = (resized_width - image_size) // 2
    return resized_height, resized_width, top, left


def _to_unit_range(image):
    # Bilinear (triangle-filter) resizing cannot overshoot, but float rounding can
    # land a hair above 255.
    return tf.clip_by_value(image / 255.0, 0.0, 1.0)


def deterministic_view(image, image_size):
    """Resize the short side to round(S * 256 / 224), centre crop S x S.

    Args:
      image: uint8 [H, W, 3], any size (tiny images are upscaled).
      image_size: int S.

    Returns:
      float32 [S, S, 3] in [0, 1].
    """
    shape = tf.shape(image)
    resized_height, resized_width, top, left = _centre_crop_geometry(
        shape[0], shape[1], image_size
    )
    # The op behind tf.image.resize(method="bilinear", antialias=True): with the
    # crop offset as a translation it computes resize-then-crop exactly, but only
    # the S x S output pixels (and no full-size intermediate image). The triangle
    # kernel with antialias low-pass filters when downscaling; upscaling is plain
    # bilinear.
    scale = tf.cast(tf.stack([resized_height, resized_width]), tf.float32) / tf.cast(
        shape[:2], tf.float32
    )
    cropped = tf.raw_ops.ScaleAndTranslate(
        images=image[None],
        size=[image_size, image_size],
        scale=scale,
        translation=-tf.cast(tf.stack([top, left]), tf.float32),
        kernel_type="triangle",
        antialias=True,
    )[0]
    cropped.set_shape([image_size, image_size, 3])
    return _to_unit_range(cropped)


def deterministic_view_boxes(boxes, image_shape, image_size):
    """Maps boxes of the decoded image into the deterministic view.

    Args:
      boxes: float32 [N, 4] normalised [ymin, xmin, ymax, xmax]; rows of -1 are
        padding and stay -1.
      image_shape: int [>= 2], the decoded image's (height, width, ...).
      image_size: int S.

    Returns:
      float32 [N, 4] in the view's normalised coordinates, clipped to [0, 1] (a box
      entirely outside the centre crop becomes degenerate, with zero area).
    """
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    resized_height, resized_width, top, left = _centre_crop_geometry(
        image_shape[0], image_shape[1], image_size
    )
    scale = tf.cast(tf.stack([resized_height, resized_width] * 2), tf.float32)
    offset = tf.cast(tf.stack([top, left] * 2), tf.float32)
    mapped = tf.clip_by_value((boxes * scale - offset) / float(image_size), 0.0, 1.0)
    is_padding = tf.reduce_all(tf.equal(boxes, -1.0), axis=-1, keepdims=True)
    return tf.where(is_padding, boxes, mapped)


def classification_view(image, image_size, seed):
    """Random resized crop (area [0.08, 1], aspect [3/4, 4/3]) + flip p=0.5.

    The crop is sampled by `tf.image.stateless_sample_distorted_bounding_box`,
    which draws the aspect ratio uniformly (torchvision: log-uniformly) and falls
    back to the whole image after 10 failed attempts (torchvision: a centre crop).

    Args:
      image: uint8 [H, W, 3].
      image_size: int S.
      seed: int [2], a stateless seed (one per example and epoch).

    Returns:
      float32 [S, S, 3] in [0, 1].
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=crop_seed,
        min_object_covered=0.0,
        aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
        area_range=CROP_AREA_RANGE,
        max_attempts=_CROP_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, size)
    resized = tf.image.resize(crop, [image_size, image_size], method="bilinear", antialias=True)
    flip = tf.random.stateless_uniform([], seed=flip_seed) < FLIP_PROBABILITY
    resized = tf.cond(flip, lambda: tf.image.flip_left_right(resized), lambda: resized)
    resized.set_shape([image_size, image_size, 3])
    return _to_unit_range(resized)
