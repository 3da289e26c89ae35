"""The CGC paper's evaluation protocol, as its reference code computes it.

Content Heatmap as TorchRay's `evaluate_*_gradcam_energy_inside_bbox.py` (full image,
short side resized to `input_resize`, Grad-CAM mass inside the ground-truth boxes),
insertion/deletion AUC as RISE's `evaluate_auc_metrics.py` (full image resized to the
model's square input, RISE's blur and fill), and consistency at the paper's and at the
training run's crop areas. Images are float32 [H, W, 3] in [0, 1]. Every step, and how
it differs from `cgc_tf.evaluation`'s protocol: docs/evaluation.md.
"""

import math

import numpy as np
import tensorflow as tf
from PIL import Image

from cgc_tf import augment as augment_lib
from cgc_tf import backbones
from cgc_tf import evaluation
from cgc_tf import evaluation_progress
from cgc_tf import gradcam as gradcam_lib
from cgc_tf import metrics as metrics_lib

PROTOCOL = "paper"
INPUT_RESIZE = 448
# RISE at 224x224: 224 * 8 pixels per step. Other sizes keep that fraction of the
# image per step (1/28, rounded up to whole pixels): 28 steps at 224 and at 32,
# 26 at 16 (RISE's last step may change fewer pixels).
RISE_IMAGE_AREA = 224 * 224
RISE_PIXELS_PER_STEP = 224 * 8
BLUR_KERNEL_SIZE = 11
BLUR_SIGMA = 5.0
PAPER_TRANSFORM_AREA = (0.08, 1.0)
_CAM_EPSILON = 1e-8
# scipy.ndimage.gaussian_filter's default kernel radius, in sigmas.
_GAUSSIAN_TRUNCATE = 4.0


# ---------------------------------------------------------------- resizing
def short_side_size(height, width, short_side):
    """(height, width) after torchvision's `Resize(short_side)` (no crop).

    The short side becomes `short_side`; the long side `int(short_side * long /
    short)`, truncated as torchvision does.
    """
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def resize_image(images, size):
    """torchvision's resize of a PIL image: PIL's bilinear filter on 8-bit pixels.

    PIL's bilinear filter is a triangle widened when downscaling (antialiased),
    applied along the width and then the height, rounding to 8 bits after each
    pass; `tf.image.resize(antialias=True)` is the same filter but differs by a
    level on some pixels, so PIL itself resizes here (on the host, like the
    reference's data loader). An image already of `size` is returned unchanged,
    as PIL does.

    Args:
      images: float32 [B, H, W, 3] in [0, 1], multiples of 1/255 (decoded 8-bit).
      size: (height, width) ints.

    Returns:
      float32 [B, height, width, 3] in [0, 1].
    """
    images = np.asarray(images, np.float32)
    if tuple(images.shape[1:3]) == tuple(size):
        return tf.constant(images)
    levels = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    resized = [
        np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
        for image in levels
    ]
    return tf.constant(np.stack(resized).astype(np.float32) / 255.0)


# ---------------------------------------------------------- Content Heatmap
def content_heatmap(cams, boxes, image_size):
    """TorchRay's Content Heatmap of feature-resolution Grad-CAMs.

    Args:
      cams: float [B, h, w] non-negative Grad-CAM (ReLU'd) at the feature
        resolution, of the ground-truth class.
      boxes: float32 [B, N, 4] normalised [ymin, xmin, ymax, xmax] in the native
        image frame, only the ground-truth class's boxes; rows of -1 are padding.
      image_size: (height, width) ints, the native image size.

    Returns:
      (percent float32 [B] in [0, 100], zero_cam bool [B]: the Grad-CAM was all
      zero, so the map was uniform and the percent is the boxes' area fraction).
    """
    cams = tf.cast(tf.convert_to_tensor(cams), tf.float32)
    total = tf.reduce_sum(cams, axis=[1, 2], keepdims=True)
    normalised = cams / (total + _CAM_EPSILON) + _CAM_EPSILON
    # cv2.resize(INTER_LINEAR) on float32 is half-pixel bilinear, as tf.image.resize.
    resized = tf.image.resize(normalised[..., None], image_size, method="bilinear")[..., 0]
    resized = resized / tf.reduce_sum(resized, axis=[1, 2], keepdims=True)
    mask = tf.cast(metrics_lib.boxes_to_mask(boxes, image_size[0], image_size[1]), tf.float32)
    percent = 100.0 * tf.reduce_sum(resized * mask, axis=[1, 2])
    return percent, tf.equal(total[:, 0, 0], 0.0)


# ------------------------------------------------------ insertion / deletion
def rise_blur_kernel(kernel_size=BLUR_KERNEL_SIZE, sigma=BLUR_SIGMA):
    """RISE's `gkern`: scipy's `gaussian_filter` of a centred delta, float32 [k, k].

    scipy's filter has radius 4 sigma (20 pixels at sigma 5) and reflects at the
    borders of the k x k delta image ("reflect": d c b a | a b c d | d c b a),
    so the kernel is not a truncated Gaussian: the reflected tails fold back in.
    It is separable, the outer product of the 1-D filtered delta.
    """
    radius = int(_GAUSSIAN_TRUNCATE * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    centre = kernel_size // 2
    line = np.zeros(kernel_size)
    for position in range(kernel_size):
        for offset, weight in zip(offsets, weights):
            source = (position + offset) % (2 * kernel_size)
            if source >= kernel_size:
                source = 2 * kernel_size - 1 - source
            if source == centre:
                line[position] += weight
    return np.outer(line, line).astype(np.float32)


def rise_blur(images, kernel_size=BLUR_KERNEL_SIZE, sigma=BLUR_SIGMA):
    """RISE's insertion substrate for images in [0, 1].

    RISE convolves the ImageNet-normalised image with `rise_blur_kernel` per
    channel, zero padding; in [0, 1] that is conv(x - mean) + mean, the padding
    being the ImageNet mean colour.

    Args:
      images: float32 [B, H, W, 3] in [0, 1].

    Returns:
      float32 [B, H, W, 3].
    """
    images = tf.convert_to_tensor(images, tf.float32)
    mean = tf.constant(backbones.IMAGENET_MEAN, tf.float32)
    kernel = tf.constant(rise_blur_kernel(kernel_size, sigma))[:, :, None, None]
    kernel = tf.tile(kernel, [1, 1, 3, 1])
    blurred = tf.nn.depthwise_conv2d(images - mean, kernel, [1, 1, 1, 1], "SAME")
    return blurred + mean


def default_pixels_per_step(height, width):
    """RISE's 224 * 8 pixels per step at 224x224, the same fraction elsewhere."""
    return max(1, math.ceil(height * width * RISE_PIXELS_PER_STEP / RISE_IMAGE_AREA))


def saliency_ranks(heatmaps):
    """int32 [B, H*W]: each pixel's position in RISE's order (0 = first changed).

    RISE orders by `np.flip(np.argsort(saliency))`: decreasing saliency, ties in
    decreasing row-major position when the sort is stable (numpy's default sort
    is not, so the reference's order among exact ties is unspecified).
    """
    batch_size = tf.shape(heatmaps)[0]
    flat = tf.reshape(tf.cast(heatmaps, tf.float32), [batch_size, -1])
    order = tf.reverse(tf.argsort(flat, axis=-1, stable=True), axis=[-1])
    return tf.argsort(order, axis=-1, stable=True)


def rise_curves(logits_fn, images, heatmaps, pixels_per_step=None, class_index=None,
                chunk_size=metrics_lib.DEFAULT_CHUNK_SIZE):
    """RISE's insertion and deletion curves, batched.

    Point i of a curve is the softmax probability of the scored class after the
    first min(i * pixels_per_step, H * W) pixels were inserted (into the blurred
    image) or deleted (set to RISE's zeros, the ImageNet mean colour).

    Args:
      logits_fn: callable, float32 images [n, H, W, 3] -> logits [n, K].
      images: float32 [B, H, W, 3] in [0, 1], at the model's input size.
      heatmaps: float [B, H, W] saliency.
      pixels_per_step: int >= 1; None: `default_pixels_per_step`.
      class_index: optional int [B]; None: the prediction on `images` (RISE).
      chunk_size: int >= 1, maximum images per `logits_fn` call.

    Returns:
      (insertion float32 [B, steps + 1], deletion float32 [B, steps + 1],
      class_index int32 [B]).
    """
    images = tf.convert_to_tensor(images, tf.float32)
    batch_size, height, width = (int(d) for d in images.shape[:3])
    num_pixels = height * width
    if pixels_per_step is None:
        pixels_per_step = default_pixels_per_step(height, width)
    if not isinstance(pixels_per_step, int) or pixels_per_step < 1:
        raise ValueError(f"`pixels_per_step` must be an int >= 1; received {pixels_per_step!r}.")
    if class_index is None:
        class_index = tf.argmax(logits_fn(images), axis=-1, output_type=tf.int32)
    class_index = tf.cast(class_index, tf.int32)
    steps = -(-num_pixels // pixels_per_step)
    counts = tf.minimum(tf.range(steps + 1) * pixels_per_step, num_pixels)
    ranks = tf.reshape(saliency_ranks(heatmaps), [batch_size, 1, height, width, 1])
    blurred = rise_blur(images)[:, None]
    mean_colour = tf.constant(backbones.IMAGENET_MEAN, tf.float32)
    originals = images[:, None]
    steps_per_chunk = max(1, chunk_size // (2 * batch_size))
    insertion, deletion = [], []
    for start in range(0, steps + 1, steps_per_chunk):
        chunk_counts = counts[start : start + steps_per_chunk]
        num_steps = int(chunk_counts.shape[0])
        changed = ranks < chunk_counts[None, :, None, None, None]  # [B, s, H, W, 1]
        inserted = tf.where(changed, originals, blurred)
        deleted = tf.where(changed, mean_colour, originals)
        step_images = tf.reshape(
            tf.concat([inserted, deleted], axis=1), [2 * batch_size * num_steps, height, width, 3]
        )
        probabilities = []
        for offset in range(0, 2 * batch_size * num_steps, chunk_size):
            logits = tf.cast(logits_fn(step_images[offset : offset + chunk_size]), tf.float32)
            probabilities.append(tf.nn.softmax(logits, axis=-1))
        probabilities = tf.reshape(tf.concat(probabilities, 0), [batch_size, 2 * num_steps, -1])
        selected = tf.gather(probabilities, class_index, axis=2, batch_dims=1)
        insertion.append(selected[:, :num_steps])
        deletion.append(selected[:, num_steps:])
    return tf.concat(insertion, axis=1), tf.concat(deletion, axis=1), class_index


def rise_auc(curves):
    """RISE's `auc`: (sum - first / 2 - last / 2) / steps, float32 [B] of [B, steps + 1]."""
    curves = tf.convert_to_tensor(curves, tf.float32)
    steps = tf.cast(tf.shape(curves)[-1] - 1, tf.float32)
    return (tf.reduce_sum(curves, -1) - curves[:, 0] / 2 - curves[:, -1] / 2) / steps


# --------------------------------------------------------------- evaluation
class _AnySizeExtractor:
    """Calls a functional (features, logits) model on images of any size.

    A Keras functional model checks its inputs against the input shape it was
    built with; its `call` runs the same layers without that check, and
    convolutional backbones with global pooling accept any size.
    """

    def __init__(self, extractor):
        self._extractor = extractor

    def __call__(self, images, training=False):
        return self._extractor.call(images, training=training)


def _explainer_parts(model):
    """(explainer, feature-resolution Grad-CAM function for any image size)."""
    explainer = evaluation.as_explainer(model)
    extractor = getattr(getattr(explainer, "model", None), "extractor", None)
    if extractor is None:
        raise ValueError(
            "the paper protocol feeds full images of any size, so it needs a Keras model "
            f"(a CGCModel or a functional classifier); received {type(model).__name__}"
        )
    any_size = _AnySizeExtractor(extractor)

    @tf.function(reduce_retracing=True)
    def feature_cams(images, class_index):
        return gradcam_lib.gradcam(any_size, images, class_index, training=False)[1]

    return explainer, feature_cams


def _batches(examples, batch_size, max_images):
    """Lists of consecutive examples with equal image sizes, at most batch_size each."""
    batch, taken = [], 0
    for example in examples:
        if max_images is not None and taken >= max_images:
            break
        full = len(batch) == batch_size
        if batch and (full or batch[0]["image"].shape != example["image"].shape):
            yield batch
            batch = []
        batch.append(example)
        taken += 1
    if batch:
        yield batch


def _ground_truth_boxes(batch):
    """float32 [B, N, 4]: each image's boxes of its label, padded with -1 rows."""
    kept = [
        np.asarray(e["boxes"], np.float32)[np.asarray(e["box_labels"]) == e["label"]] for e in batch
    ]
    width = max(1, max(len(boxes) for boxes in kept))
    padded = np.full([len(batch), width, 4], -1.0, np.float32)
    for index, boxes in enumerate(kept):
        padded[index, : len(boxes)] = boxes
    return padded


def evaluate_paper(model, examples, input_resize=INPUT_RESIZE, pixels_per_step=None,
                   transform_min_area=None, seed=0, batch_size=32, max_images=None,
                   progress=True):
    """Content Heatmap, insertion/deletion and consistency as the paper measures them.

    Args:
      model: a `CGCModel`, a functional keras classifier (images in [0, 1] ->
        logits) or an `evaluation.Explainer`.
      examples: iterable of example dicts from `cgc_tf.data.annotated` ("image"
        uint8 [H, W, 3] native size, "label", "boxes", "box_labels").
      input_resize: int, the short side of the Content Heatmap input.
      pixels_per_step: insertion/deletion pixels per step; None: RISE's fraction.
      transform_min_area: optional float in (0, 1], the training run's
        `transform_min_area`: consistency is also reported for T drawn with crop
        areas in [transform_min_area, 1].
      seed: int, seeds the transforms T.
      batch_size: int >= 1, images per batch (consecutive images of one size).
      max_images: optional int >= 1.
      progress: True prints progress lines (`evaluation_progress.ProgressLine`);
        a callable is called as `progress(stage, done, total)` after each of the
        stages "content heatmap", "insertion/deletion" and "consistency" of each
        batch (total: max_images or len(examples), None if neither is known).

    Returns:
      dict of JSON values, "protocol": "paper", the settings, and the means:
      content_heatmap_percent (+ _count, content_heatmap_zero_cams),
      insertion_auc, deletion_auc, accuracy_full_image (on the squared full
      image, as RISE scores it), consistency_{cosine,pearson}_paper_transforms
      and, with transform_min_area, ..._training_transforms; num_images.
    """
    if not isinstance(input_resize, int) or input_resize < 1:
        raise ValueError(f"`input_resize` must be an int >= 1; received {input_resize!r}.")
    explainer, feature_cams = _explainer_parts(model)
    side = explainer.image_size
    if None in tuple(side):
        raise ValueError(
            "insertion/deletion resize the full image to the model's input size, so the "
            f"model needs a fixed one; its input is {side}"
        )
    augmentations = {
        "paper": augment_lib.PairedAugmentation(area_range=PAPER_TRANSFORM_AREA, seed=seed)
    }
    if transform_min_area is not None:
        augmentations["training"] = augment_lib.PairedAugmentation(
            area_range=(float(transform_min_area), 1.0), seed=seed
        )
    values = {name: [] for name in ("content_heatmap_percent", "zero_cam", "insertion_auc",
                                   "deletion_auc", "accuracy_full_image")}
    for name in augmentations:
        values[f"consistency_cosine_{name}_transforms"] = []
        values[f"consistency_pearson_{name}_transforms"] = []
    progress = evaluation_progress.Progress(progress, "Paper protocol")
    known = [n for n in (max_images, len(examples) if hasattr(examples, "__len__") else None)
             if n is not None]
    progress.total = min(known) if known else None
    num_images, steps = 0, None
    try:
        for batch in _batches(examples, batch_size, max_images):
            images = tf.constant(np.stack([e["image"] for e in batch]), tf.float32) / 255.0
            labels = tf.constant([e["label"] for e in batch], tf.int32)
            height, width = int(images.shape[1]), int(images.shape[2])
            # Content Heatmap: the full image, short side input_resize, native-size mask.
            resized = resize_image(images, short_side_size(height, width, input_resize))
            try:
                cams = feature_cams(resized, labels)
            except (ValueError, tf.errors.InvalidArgumentError) as error:
                raise ValueError(
                    f"the model cannot take the full {resized.shape[1]}x{resized.shape[2]} image "
                    f"(input_resize={input_resize}) that the paper's Content Heatmap feeds it; it "
                    f"needs a global pooling head, as the reference's ResNets have ({error})"
                ) from None
            percent, zero_cam = content_heatmap(cams, _ground_truth_boxes(batch), (height, width))
            values["content_heatmap_percent"].append(percent.numpy())
            values["zero_cam"].append(zero_cam.numpy())
            done = num_images + len(batch)
            progress.report("content heatmap", done)
            # Insertion / deletion and consistency: the full image squeezed to the input.
            square = resize_image(images, side)
            explained = explainer.explain(square, class_index=labels)
            insertion, deletion, predicted = rise_curves(
                explainer.logits, square, explained["heatmap"], pixels_per_step
            )
            steps = int(insertion.shape[1]) - 1
            values["insertion_auc"].append(rise_auc(insertion).numpy())
            values["deletion_auc"].append(rise_auc(deletion).numpy())
            correct = tf.cast(tf.equal(predicted, labels), tf.float32)
            values["accuracy_full_image"].append(correct.numpy())
            progress.report("insertion/deletion", done)
            for name, augmentation in augmentations.items():
                transform = augmentation.sample(len(batch), side[0], side[1])
                cosine, pearson = metrics_lib.consistency(
                    explainer, square, augmentation=augmentation, transform=transform
                )
                values[f"consistency_cosine_{name}_transforms"].append(cosine.numpy())
                values[f"consistency_pearson_{name}_transforms"].append(pearson.numpy())
            progress.report("consistency", done)
            num_images = done
    finally:
        progress.close()
    if num_images == 0:
        raise ValueError("`examples` yielded no images to evaluate")
    means = {
        name: float(np.mean(np.concatenate(v))) for name, v in values.items() if name != "zero_cam"
    }
    result = {
        "protocol": PROTOCOL,
        "input_resize": input_resize,
        "auc_image_size": list(side),
        "auc_pixels_per_step": pixels_per_step or default_pixels_per_step(*side),
        "auc_steps": steps,
        "paper_transform_area": list(PAPER_TRANSFORM_AREA),
        "content_heatmap_count": num_images,
        "content_heatmap_zero_cams": int(np.concatenate(values["zero_cam"]).sum()),
        "num_images": num_images,
        **means,
    }
    if transform_min_area is not None:
        result["training_transform_area"] = [float(transform_min_area), 1.0]
    return result
