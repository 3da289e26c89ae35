"""Explanation metrics on tensors, one value per image (list: docs/evaluation.md).

Images float32 [B, H, W, 3] in [0, 1]; heatmaps float [B, H, W], non-negative, any
scale; boxes float32 [B, N, 4] normalised [ymin, xmin, ymax, xmax], padded with -1 rows.
"""

import keras
import tensorflow as tf

from cgc_tf import augment as augment_lib
from cgc_tf import gradcam as gradcam_lib
from cgc_tf.explanation_metrics import max_sensitivity  # noqa: F401 (re-exported)
from cgc_tf.explanation_metrics import randomization_sanity  # noqa: F401 (re-exported)
from cgc_tf.explanation_metrics import road  # noqa: F401 (re-exported)
from cgc_tf.explanation_metrics import sparseness  # noqa: F401 (re-exported)

# RISE's blur for the insertion start image (docs/method.md): an 11x11 Gaussian, sigma 5.
BLUR_KERNEL_SIZE = 11
BLUR_SIGMA = 5.0
DEFAULT_AUC_STEPS = 32
# Images per forward pass when scoring the insertion/deletion step images.
DEFAULT_CHUNK_SIZE = 256
_EPSILON = 1e-12


def _check_rank(name, tensor, ranks):
    if tensor.shape.rank not in ranks:
        allowed = " or ".join(f"rank {rank}" for rank in ranks)
        raise ValueError(f"`{name}` must have {allowed}; received shape {tensor.shape}.")


def _as_boxes(boxes):
    """float32 [B, N, 4] from [B, N, 4] or a single box per image [B, 4]."""
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    _check_rank("boxes", boxes, (2, 3))
    if boxes.shape.rank == 2:
        boxes = boxes[:, None, :]
    if boxes.shape[-1] != 4:
        raise ValueError(
            f"`boxes` must end in 4 coordinates [ymin, xmin, ymax, xmax]; received shape "
            f"{boxes.shape}."
        )
    return boxes


def _as_heatmaps(heatmaps):
    heatmaps = tf.convert_to_tensor(heatmaps)
    _check_rank("heatmaps", heatmaps, (3,))
    return tf.cast(heatmaps, tf.float32)


def boxes_to_mask(boxes, height, width):
    """Pixels whose centre lies inside the union of the boxes.

    Args:
      boxes: float32 [B, N, 4] (or [B, 4]) normalised [ymin, xmin, ymax, xmax];
        rows whose coordinates are all negative (the -1 padding) are ignored.
      height, width: int, the mask size.

    Returns:
      bool [B, height, width].
    """
    boxes = _as_boxes(boxes)
    valid = tf.logical_not(tf.reduce_all(boxes < 0.0, axis=-1))  # [B, N]
    boxes = tf.clip_by_value(boxes, 0.0, 1.0)
    rows = (tf.range(height, dtype=tf.float32) + 0.5) / tf.cast(height, tf.float32)
    columns = (tf.range(width, dtype=tf.float32) + 0.5) / tf.cast(width, tf.float32)
    ymin, xmin, ymax, xmax = [boxes[..., i, None] for i in range(4)]  # [B, N, 1]
    inside_rows = tf.logical_and(rows >= ymin, rows <= ymax)  # [B, N, H]
    inside_columns = tf.logical_and(columns >= xmin, columns <= xmax)  # [B, N, W]
    inside = tf.logical_and(inside_rows[..., :, None], inside_columns[..., None, :])
    inside = tf.logical_and(inside, valid[..., None, None])
    return tf.reduce_any(inside, axis=1)


def content_heatmap(heatmaps, boxes):
    """Content Heatmap: percent of the (sum-normalised) heatmap inside the boxes.

    Args:
      heatmaps: float [B, H, W], non-negative, any scale (normalised here to sum 1).
      boxes: float32 [B, N, 4] (or [B, 4]) normalised [ymin, xmin, ymax, xmax],
        rows of -1 are padding.

    Returns:
      (percent float32 [B] in [0, 100], valid bool [B]). An image is invalid, and
      its percent 0, when its heatmap is all zero (docs/method.md skips those) or it has
      no box; aggregators average over the valid images and count the others.
    """
    heatmaps = _as_heatmaps(heatmaps)
    tf.debugging.assert_non_negative(heatmaps, message="`heatmaps` must be non-negative")
    height, width = tf.shape(heatmaps)[1], tf.shape(heatmaps)[2]
    mask = tf.cast(boxes_to_mask(boxes, height, width), tf.float32)
    total = tf.reduce_sum(heatmaps, axis=[1, 2])
    inside = tf.reduce_sum(heatmaps * mask, axis=[1, 2])
    has_box = tf.reduce_any(mask > 0.0, axis=[1, 2])
    valid = tf.logical_and(total > 0.0, has_box)
    percent = tf.where(valid, 100.0 * inside / tf.maximum(total, _EPSILON), 0.0)
    return percent, valid


def pointing_game(heatmaps, boxes):
    """Pointing game: is the heatmap's maximum inside a box?

    Args:
      heatmaps: float [B, H, W].
      boxes: float32 [B, N, 4] (or [B, 4]) normalised, rows of -1 are padding.

    Returns:
      hit bool [B]. An all-zero heatmap points nowhere and counts as a miss; ties
      go to the first maximum in row-major order.
    """
    heatmaps = _as_heatmaps(heatmaps)
    batch_size = tf.shape(heatmaps)[0]
    height, width = tf.shape(heatmaps)[1], tf.shape(heatmaps)[2]
    mask = tf.reshape(boxes_to_mask(boxes, height, width), [batch_size, -1])
    flat = tf.reshape(heatmaps, [batch_size, -1])
    peak = tf.argmax(flat, axis=-1, output_type=tf.int32)
    hit = tf.gather(mask, peak, axis=1, batch_dims=1)
    return tf.logical_and(hit, tf.reduce_max(flat, axis=-1) > 0.0)


def top1_accuracy(logits, labels):
    """Per-image top-1 correctness; its mean is the accuracy.

    Args:
      logits: float [B, K].
      labels: int [B].

    Returns:
      float32 [B], 1.0 where argmax(logits) == label, else 0.0.
    """
    predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.cast(tf.equal(predictions, tf.cast(labels, tf.int32)), tf.float32)


def gaussian_blur(images, kernel_size=BLUR_KERNEL_SIZE, sigma=BLUR_SIGMA):
    """RISE's blurred substrate: a normalised sampled Gaussian, zero padding.

    `keras.ops.image.gaussian_blur` is a depthwise convolution (one kernel per
    channel, so colours do not mix) with "SAME" zero padding, which is what the
    RISE code does (`conv2d(x, gkern, padding=klen // 2)`); we use it rather than a
    hand-written convolution. RISE samples its kernel with scipy's
    `gaussian_filter` of a delta; ours is exp(-d^2 / (2 sigma^2)) normalised to
    sum 1, the same up to the truncation of the tails.

    Args:
      images: float [B, H, W, C].
      kernel_size: odd int, the kernel side.
      sigma: float > 0, the standard deviation in pixels.

    Returns:
      float32 [B, H, W, C].
    """
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"`kernel_size` must be an odd positive int; received {kernel_size!r}.")
    if not sigma > 0:
        raise ValueError(f"`sigma` must be > 0; received {sigma!r}.")
    images = tf.cast(tf.convert_to_tensor(images), tf.float32)
    _check_rank("images", images, (4,))
    return keras.ops.image.gaussian_blur(
        images,
        kernel_size=(kernel_size, kernel_size),
        sigma=(float(sigma), float(sigma)),
        data_format="channels_last",
    )


def _pixel_ranks(heatmaps):
    """int32 [B, H*W]: 0 for the most salient pixel, ties in row-major order."""
    batch_size = tf.shape(heatmaps)[0]
    flat = tf.reshape(heatmaps, [batch_size, -1])
    order = tf.argsort(flat, axis=-1, direction="DESCENDING", stable=True)
    # The inverse permutation, batched (tf.math.invert_permutation is 1-D only).
    return tf.argsort(order, axis=-1, stable=True)


def insertion_deletion_curves(
    model_fn,
    images,
    heatmaps,
    class_index,
    steps=DEFAULT_AUC_STEPS,
    deletion_value=0.0,
    chunk_size=DEFAULT_CHUNK_SIZE,
):
    """RISE insertion and deletion curves.

    Pixels are ordered by heatmap value, highest first. Step k of `steps` reveals
    (insertion) or removes (deletion) the first round(k / steps * H * W) pixels.
    Insertion starts from `gaussian_blur(images)` and ends at the image; deletion
    starts from the image and ends at `deletion_value` everywhere. RISE's deletion
    substrate is zeros; RISE feeds ImageNet-normalised tensors, where zero is the
    mean colour, while our images are in [0, 1], so the default 0.0 is black.

    The step images of both curves for the whole batch, 2 * B * (steps + 1) of
    them, are built as batched tensors and scored in forward passes of at most
    `chunk_size` images (this bounds memory; larger is faster on CPU).

    Args:
      model_fn: callable, float32 images [n, H, W, 3] -> logits [n, K].
      images: float32 [B, H, W, 3] in [0, 1].
      heatmaps: float [B, H, W], same H and W as `images`.
      class_index: int [B], the class whose softmax probability forms the curve.
      steps: int >= 1, number of steps from 0 to all pixels.
      deletion_value: float, the value of removed pixels.
      chunk_size: int >= 1, maximum images per `model_fn` call.

    Returns:
      (fractions float32 [steps + 1] of pixels revealed/removed,
       insertion float32 [B, steps + 1], deletion float32 [B, steps + 1]).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an int >= 1; received {steps!r}.")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be an int >= 1; received {chunk_size!r}.")
    images = tf.cast(tf.convert_to_tensor(images), tf.float32)
    _check_rank("images", images, (4,))
    heatmaps = _as_heatmaps(heatmaps)
    if images.shape[1:3] != heatmaps.shape[1:3]:
        raise ValueError(
            f"`heatmaps` must have the spatial size of `images`; received heatmaps "
            f"{heatmaps.shape} and images {images.shape}."
        )
    class_index = tf.cast(tf.convert_to_tensor(class_index), tf.int32)
    batch_size = int(images.shape[0]) if images.shape[0] is not None else None
    if batch_size is None:
        raise ValueError("insertion_deletion_curves needs a static batch size (call it eagerly).")
    height, width = int(images.shape[1]), int(images.shape[2])
    num_pixels = height * width
    counts = tf.cast(
        tf.round(tf.range(steps + 1, dtype=tf.float64) * num_pixels / steps), tf.int32
    )
    fractions = tf.cast(counts, tf.float32) / float(num_pixels)
    ranks = _pixel_ranks(heatmaps)  # [B, H*W]
    blurred = gaussian_blur(images)
    # Both curves of one step go through the same forward pass: 2 images per step.
    steps_per_chunk = max(1, chunk_size // (2 * batch_size))
    insertion, deletion = [], []
    for start in range(0, steps + 1, steps_per_chunk):
        chunk_counts = counts[start : start + steps_per_chunk]
        num_steps = int(chunk_counts.shape[0])
        # changed[b, s, pixel]: the pixel is among the first count_s of image b.
        changed = ranks[:, None, :] < chunk_counts[None, :, None]
        changed = tf.reshape(
            tf.cast(changed, tf.float32), [batch_size, num_steps, height, width, 1]
        )
        originals = images[:, None]
        inserted = blurred[:, None] * (1.0 - changed) + originals * changed
        deleted = originals * (1.0 - changed) + deletion_value * changed
        step_images = tf.reshape(
            tf.concat([inserted, deleted], axis=1), [2 * batch_size * num_steps, height, width, 3]
        )
        probabilities = []
        for offset in range(0, 2 * batch_size * num_steps, chunk_size):
            logits = model_fn(step_images[offset : offset + chunk_size])
            probabilities.append(tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1))
        probabilities = tf.reshape(
            tf.concat(probabilities, axis=0), [batch_size, 2 * num_steps, -1]
        )
        selected = tf.gather(probabilities, class_index, axis=2, batch_dims=1)  # [B, 2s]
        insertion.append(selected[:, :num_steps])
        deletion.append(selected[:, num_steps:])
    return fractions, tf.concat(insertion, axis=1), tf.concat(deletion, axis=1)


def area_under_curve(fractions, curves):
    """Trapezoid rule: float32 [B] area of curves [B, T] over fractions [T] in [0, 1]."""
    widths = fractions[1:] - fractions[:-1]
    heights = 0.5 * (curves[:, 1:] + curves[:, :-1])
    return tf.reduce_sum(heights * widths[None, :], axis=-1)


def insertion_deletion_auc(
    model_fn,
    images,
    heatmaps,
    class_index,
    steps=DEFAULT_AUC_STEPS,
    deletion_value=0.0,
    chunk_size=DEFAULT_CHUNK_SIZE,
):
    """RISE insertion and deletion AUCs (see `insertion_deletion_curves`).

    Args:
      model_fn: callable, float32 images [n, H, W, 3] -> logits [n, K].
      images: float32 [B, H, W, 3] in [0, 1].
      heatmaps: float [B, H, W].
      class_index: int [B].
      steps: int >= 1, number of steps.
      deletion_value: float, the value of removed pixels.
      chunk_size: int >= 1, maximum images per `model_fn` call.

    Returns:
      (insertion float32 [B], deletion float32 [B]), both in [0, 1]; insertion:
      higher is better, deletion: lower is better.
    """
    fractions, insertion, deletion = insertion_deletion_curves(
        model_fn, images, heatmaps, class_index, steps, deletion_value, chunk_size
    )
    return area_under_curve(fractions, insertion), area_under_curve(fractions, deletion)


def heatmap_agreement(first, second):
    """Cosine similarity and Pearson correlation of flattened heatmap pairs.

    Args:
      first, second: float [B, H, W].

    Returns:
      (cosine float32 [B], pearson float32 [B]). A pair where one heatmap is
      all zero (cosine) or constant (Pearson) scores 0: it carries no location.
    """
    batch_size = tf.shape(first)[0]
    first = tf.reshape(tf.cast(first, tf.float32), [batch_size, -1])
    second = tf.reshape(tf.cast(second, tf.float32), [batch_size, -1])

    def cosine(a, b):
        norms = tf.norm(a, axis=-1) * tf.norm(b, axis=-1)
        dot = tf.reduce_sum(a * b, axis=-1)
        return tf.where(norms > _EPSILON, dot / tf.maximum(norms, _EPSILON), 0.0)

    centred_first = first - tf.reduce_mean(first, axis=-1, keepdims=True)
    centred_second = second - tf.reduce_mean(second, axis=-1, keepdims=True)
    return cosine(first, second), cosine(centred_first, centred_second)


def _heatmap_function(model_or_extractor):
    """(images, class_index or None) -> (heatmaps [B, H, W], class_index [B])."""
    if callable(getattr(model_or_extractor, "explain", None)):

        def explain(images, class_index):
            outputs = model_or_extractor.explain(images, class_index=class_index)
            return tf.cast(outputs["heatmap"], tf.float32), (
                outputs["class_id"] if class_index is None else class_index
            )

        return explain
    if isinstance(model_or_extractor, keras.Model) and len(model_or_extractor.outputs) == 2:

        def extract(images, class_index):
            _, cam, class_index = gradcam_lib.gradcam(model_or_extractor, images, class_index)
            return gradcam_lib.upsample(cam, tf.shape(images)[1:3]), class_index

        return extract
    raise ValueError(
        "`model_or_extractor` must have an `explain(images, class_index)` method (e.g. "
        "cgc_tf.CGCModel) or be a Grad-CAM extractor from cgc_tf.gradcam.feature_model "
        f"(outputs [features, logits]); received {type(model_or_extractor).__name__}."
    )


def seeded_augmentation(augmentation, seed):
    """A copy of a PairedAugmentation whose random stream starts from `seed`.

    Two models evaluated with the same seed on the same batches get the same
    transforms. (keras-cv geometric layers draw from their own generators; with
    those, sample once and pass the transform to every model instead.)
    """
    if augmentation is None:
        return augment_lib.PairedAugmentation(seed=seed)
    if not isinstance(augmentation, augment_lib.PairedAugmentation):
        raise ValueError(
            "`augmentation` must be a cgc_tf.PairedAugmentation or None; received "
            f"{type(augmentation).__name__}."
        )
    config = augmentation.get_config()
    config["seed"] = seed
    return augment_lib.PairedAugmentation.from_config(config)


def consistency(
    model_or_extractor,
    images,
    augmentation=None,
    seed=0,
    transform=None,
    transformed_images=None,
):
    """Explanation consistency: cam(T(x)) against T(cam(x)) for a random T.

    Heatmaps are Grad-CAM for the predicted class of x, used for T(x) as well (as in
    training), upsampled to the image size.

    Args:
      model_or_extractor: an object with `explain(images, class_index)` returning a
        dict with "heatmap" and "class_id" (e.g. `cgc_tf.CGCModel`), or a Grad-CAM
        extractor from `cgc_tf.gradcam.feature_model`.
      images: float32 [B, H, W, 3] in [0, 1].
      augmentation: `cgc_tf.PairedAugmentation`, or None for the paper's T
        (random resized crop + horizontal flip).
      seed: int, seeds the transform when `transform` is None.
      transform: optional dict from `augmentation.sample(B, H, W)`; pass the same
        dict to compare models on identical transforms.
      transformed_images: optional float32 [B, H, W, 3], T(images) already
        computed with `transform` (saves the work when comparing models).

    Returns:
      (cosine float32 [B] in [-1, 1], pearson float32 [B] in [-1, 1]); see
      `heatmap_agreement`.
    """
    heatmap_fn = _heatmap_function(model_or_extractor)
    images = tf.cast(tf.convert_to_tensor(images), tf.float32)
    _check_rank("images", images, (4,))
    if transform is None:
        augmentation = seeded_augmentation(augmentation, seed)
        transform = augmentation.sample(tf.shape(images)[0], images.shape[1], images.shape[2])
    elif augmentation is None:
        augmentation = augment_lib.PairedAugmentation()
    if transformed_images is None:
        transformed_images = augmentation.apply_to_images(images, transform)
    heatmaps, class_index = heatmap_fn(images, None)
    transformed_heatmaps, _ = heatmap_fn(transformed_images, class_index)
    warped = augmentation.apply_to_heatmaps(heatmaps, transform)
    return heatmap_agreement(transformed_heatmaps, warped)
