"""Evaluate explanations of one or several models over a dataset ("cgc_tf" protocol).

`evaluate_model` returns a flat dict of metric means and counts (metrics.json),
`compare_models` adds paired differences on the same images and transforms T,
`evaluate_consistency` measures consistency alone under another T. Which class
each metric explains, and the reference's protocol: docs/evaluation.md.
"""

import numpy as np
import tensorflow as tf

from cgc_tf import evaluation_progress
from cgc_tf import evaluation_summary
from cgc_tf import metrics as metrics_lib
from cgc_tf.evaluation_grid import grid_explanations
from cgc_tf.evaluation_grid import save_grid
from cgc_tf.evaluation_summary import HIGHER_IS_BETTER
from cgc_tf.evaluation_summary import PER_IMAGE_METRICS
from cgc_tf.evaluation_summary import balanced_accuracy
from cgc_tf.evaluation_summary import comparison_table
from cgc_tf.model_loading import Explainer
from cgc_tf.model_loading import SavedModelExplainer
from cgc_tf.model_loading import as_explainer
from cgc_tf.model_loading import check_batch
from cgc_tf.model_loading import load_model

__all__ = [
    "HIGHER_IS_BETTER",
    "PER_IMAGE_METRICS",
    "PROTOCOL",
    "Explainer",
    "SavedModelExplainer",
    "as_explainer",
    "balanced_accuracy",
    "compare_models",
    "comparison_table",
    "evaluate_consistency",
    "evaluate_model",
    "evaluate_models",
    "grid_explanations",
    "load_model",
    "save_grid",
    "take_images",
]

# This module's protocol, recorded beside its numbers ("paper": cgc_tf.paper_protocol).
PROTOCOL = "cgc_tf"
# The stages of one batch, as the progress hook names them.
GRADCAM_STAGE = "grad-cam"  # ground-truth heatmaps: accuracy, Content Heatmap, pointing game
INSERTION_DELETION_STAGE = "insertion/deletion"
CONSISTENCY_STAGE = "consistency"


def _unpack_batch(batch):
    """(images float32, labels int32, boxes float32 or None) from a dataset element."""
    if isinstance(batch, dict):
        missing = [key for key in ("image", "label") if key not in batch]
        if missing:
            raise ValueError(
                f"dataset elements must be dicts with 'image', 'label' and optional 'bbox'; "
                f"this one lacks {missing} (keys {sorted(batch)})"
            )
        images, labels, boxes = batch["image"], batch["label"], batch.get("bbox")
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        (images, labels), boxes = batch, None
        if isinstance(images, dict):  # cgc_tf.data.eval_dataset without boxes
            images = images["image"]
    else:
        raise ValueError(
            "dataset elements must be dicts {'image', 'label', 'bbox'} or (image, label) "
            f"tuples; received {type(batch).__name__}"
        )
    images = tf.convert_to_tensor(images)
    if images.dtype == tf.uint8:
        raise ValueError(
            "dataset images must be float32 in [0, 1]; received uint8 (divide by 255, as "
            "cgc_tf.data pipelines do)"
        )
    if images.shape.rank != 4:
        raise ValueError(f"dataset images must be batched [B, H, W, 3]; received {images.shape}")
    images = tf.cast(images, tf.float32)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    if boxes is not None:
        boxes = tf.cast(boxes, tf.float32)
    return images, labels, boxes


def take_images(dataset, count):
    """The first `count` examples of a batched dataset (fewer if it ends).

    Returns:
      (images float32 [n, H, W, 3], labels int32 [n], boxes float32 [n, N, 4] or
      None) as numpy arrays, n <= count.
    """
    images, labels, boxes, taken = [], [], [], 0
    for batch in dataset:
        batch_images, batch_labels, batch_boxes = _unpack_batch(batch)
        keep = count - taken
        images.append(batch_images.numpy()[:keep])
        labels.append(batch_labels.numpy()[:keep])
        if batch_boxes is not None:
            boxes.append(batch_boxes.numpy()[:keep])
        taken += len(images[-1])
        if taken >= count:
            break
    if not images:
        raise ValueError("the dataset yielded no images")
    if boxes:
        # Batches may pad to different box counts: pad all to the largest.
        width = max(batch.shape[1] for batch in boxes)
        boxes = np.concatenate(
            [np.pad(b, [(0, 0), (0, width - b.shape[1]), (0, 0)], constant_values=-1.0)
             for b in boxes]
        )
    return np.concatenate(images), np.concatenate(labels), boxes if len(boxes) else None


def _total_images(dataset, max_batches, max_images, batch_size, dataset_size):
    """Images the evaluation will cover, for progress lines; None if unknown.

    Exact when `dataset_size` is given; otherwise an upper bound from the number
    of batches (the last batch may be smaller than the first).
    """
    limits = [value for value in (max_images, dataset_size) if value is not None]
    if max_batches is not None:
        limits.append(max_batches * batch_size)
    cardinality = int(dataset.cardinality()) if hasattr(dataset, "cardinality") else -1
    if cardinality >= 0 and dataset_size is None:
        limits.append(cardinality * batch_size)
    return min(limits) if limits else None


def _check_limits(**limits):
    for argument, value in limits.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"`{argument}` must be None or an int >= 1; received {value!r}")


def _capped_batches(dataset, augmentation, progress, max_batches, max_images, dataset_size,
                    check=None):
    """The batches an evaluation covers, with one draw of T each.

    Stops after `max_batches` batches or `max_images` images (cutting the last
    batch); calls `check(images, labels)` on each batch before anything else runs
    on it; sets `progress.total` from the first batch's size.

    Yields:
      (images float32 [B, H, W, 3], labels int32 [B], boxes float32 [B, N, 4] or
      None, transform (`augmentation.sample`), transformed images float32
      [B, H, W, 3], images done so far including this batch: int).
    """
    num_images = 0
    for batch_index, batch in enumerate(dataset):
        if max_batches is not None and batch_index >= max_batches:
            return
        if max_images is not None and num_images >= max_images:
            return
        images, labels, boxes = _unpack_batch(batch)
        if max_images is not None and num_images + images.shape[0] > max_images:
            keep = max_images - num_images
            images, labels = images[:keep], labels[:keep]
            boxes = None if boxes is None else boxes[:keep]
        if check is not None:
            check(images, labels)
        if batch_index == 0:  # The first batch's size turns batches into images.
            progress.total = _total_images(
                dataset, max_batches, max_images, int(images.shape[0]), dataset_size
            )
        num_images += int(images.shape[0])
        transform = augmentation.sample(images.shape[0], images.shape[1], images.shape[2])
        yield (images, labels, boxes, transform,
               augmentation.apply_to_images(images, transform), num_images)


def _batch_metrics(explainer, images, labels, boxes, augmentation, transform, transformed, steps,
                   report):
    """Per-image metric values of one batch for one model: name -> (values, valid).

    Calls `report(stage)` after each stage (GRADCAM_STAGE, INSERTION_DELETION_STAGE,
    CONSISTENCY_STAGE).
    """
    ground_truth = explainer.explain(images, class_index=labels)
    heatmaps = ground_truth["heatmap"]
    values = {"accuracy": (metrics_lib.top1_accuracy(ground_truth["probabilities"], labels), None)}
    if boxes is not None:
        percent, valid = metrics_lib.content_heatmap(heatmaps, boxes)
        values["content_heatmap_percent"] = (percent, valid)
        has_box = tf.reduce_any(
            metrics_lib.boxes_to_mask(boxes, images.shape[1], images.shape[2]), axis=[1, 2]
        )
        values["pointing_game"] = (
            tf.cast(metrics_lib.pointing_game(heatmaps, boxes), tf.float32),
            has_box,
        )
    report(GRADCAM_STAGE)
    insertion, deletion = metrics_lib.insertion_deletion_auc(
        explainer.logits, images, heatmaps, labels, steps=steps
    )
    values["insertion_auc"] = (insertion, None)
    values["deletion_auc"] = (deletion, None)
    report(INSERTION_DELETION_STAGE)
    cosine, pearson = metrics_lib.consistency(
        explainer,
        images,
        augmentation=augmentation,
        transform=transform,
        transformed_images=transformed,
    )
    values["consistency_cosine"] = (cosine, None)
    values["consistency_pearson"] = (pearson, None)
    report(CONSISTENCY_STAGE)
    return values


def _stage_name(name, stage, several):
    """The metric name the progress hook sees: the stage, after the model's name if several."""
    return f"{name} {stage}" if several else stage


def evaluate_models(
    models,
    dataset,
    augmentation_seed=0,
    auc_steps=metrics_lib.DEFAULT_AUC_STEPS,
    max_batches=None,
    max_images=None,
    progress=True,
    augmentation=None,
    return_per_image=False,
    dataset_size=None,
):
    """Evaluates several models in one pass, on the same images and the same T.

    Args:
      models: dict name -> model (CGCModel, keras classifier, `Explainer` or
        `SavedModelExplainer`).
      dataset: iterable of batches: dicts {"image": float32 [B, S, S, 3] in [0, 1],
        "label": int [B], optional "bbox": float32 [B, N, 4]} or (image, label).
      augmentation_seed: int; seeds the transforms T (one draw per batch, shared by
        all models), so separate runs with the same seed and data order agree.
      auc_steps: int >= 1, insertion/deletion steps.
      max_batches: optional int, stop after this many batches.
      max_images: optional int, stop after this many images (cuts the last batch).
      progress: True prints progress lines (`evaluation_progress.ProgressLine`:
        in place on a terminal, every 30 s otherwise, and a final line with the
        seconds per metric); False prints nothing; a callable is called as
        `progress(metric, done, total)` after each metric of each batch: metric
        str (GRADCAM_STAGE, INSERTION_DELETION_STAGE or CONSISTENCY_STAGE,
        after "<model name> " with several models), done int (images that
        metric has finished), total int or None (see `dataset_size`).
      augmentation: `cgc_tf.PairedAugmentation` for T; None for the paper's
        random resized crop + flip.
      return_per_image: also return the per-image values (for paired statistics).
      dataset_size: optional int, the number of images `dataset` yields (e.g.
        `DatasetInfo.splits[split]`), for progress only; without it `total` is
        an upper bound from the number of batches.

    Returns:
      dict name -> metrics dict (see `evaluate_model`); with `return_per_image`, a
      pair (that dict, dict name -> metric -> float32 [num_images] per-image values,
      NaN where the metric does not apply, e.g. CH of an all-zero heatmap).
    """
    if not isinstance(models, dict) or not models:
        raise ValueError(f"`models` must be a non-empty dict name -> model; received {models!r}")
    _check_limits(max_batches=max_batches, max_images=max_images, dataset_size=dataset_size)
    explainers = {name: as_explainer(model) for name, model in models.items()}
    augmentation = metrics_lib.seeded_augmentation(augmentation, augmentation_seed)
    per_image = {name: {metric: [] for metric in PER_IMAGE_METRICS} for name in models}
    all_labels = []
    skipped = {name: 0 for name in models}
    num_images = 0
    progress = evaluation_progress.Progress(progress, "Explanation metrics")
    try:
        for images, labels, boxes, transform, transformed, done in _capped_batches(
            dataset, augmentation, progress, max_batches, max_images, dataset_size,
            check=lambda images, labels: check_batch(images, labels, explainers),
        ):
            for name, explainer in explainers.items():
                values = _batch_metrics(
                    explainer, images, labels, boxes, augmentation, transform, transformed,
                    auc_steps,
                    lambda stage, name=name, done=done: progress.report(
                        _stage_name(name, stage, len(models) > 1), done
                    ),
                )
                for metric, (metric_values, valid) in values.items():
                    # NaN marks images a metric does not cover, keeping images aligned
                    # across models for paired comparisons.
                    metric_values = metric_values.numpy().astype(np.float32)
                    if valid is not None:
                        valid = valid.numpy()
                        if metric == "content_heatmap_percent":
                            skipped[name] += int(np.sum(~valid))
                        metric_values = np.where(valid, metric_values, np.nan)
                    per_image[name][metric].append(metric_values)
            all_labels.append(np.asarray(labels).reshape([-1]))
            num_images = done
    finally:
        progress.close()
    if num_images == 0:
        raise ValueError("the dataset yielded no images to evaluate")
    all_labels = np.concatenate(all_labels)
    results = {
        name: evaluation_summary.summarize(
            per_image[name], all_labels, num_images, skipped[name]
        )
        for name in models
    }
    if return_per_image:
        flat = {
            name: {
                metric: np.concatenate(values) if values else np.zeros([0], np.float32)
                for metric, values in per_image[name].items()
            }
            for name in models
        }
        return results, flat
    return results


def evaluate_model(
    model,
    dataset,
    augmentation_seed=0,
    auc_steps=metrics_lib.DEFAULT_AUC_STEPS,
    max_batches=None,
    progress=True,
    max_images=None,
    augmentation=None,
    dataset_size=None,
):
    """Evaluates accuracy and explanations of one model over a dataset.

    Args:
      model: `cgc_tf.CGCModel`, a functional keras classifier (target layer: its
        last 4-D layer; wrap it in `Explainer(model, target_layer)` to choose), or
        an `Explainer`.
      dataset, augmentation_seed, auc_steps, max_batches, progress, max_images,
        augmentation, dataset_size: as in `evaluate_models`.

    Returns:
      dict of Python floats/ints: for each metric in `PER_IMAGE_METRICS`, its mean
      (None when nothing was measured, e.g. CH without boxes) and `<metric>_count`
      (images averaged); `balanced_accuracy` (the mean of the per-class
      accuracies, `balanced_accuracy`); `content_heatmap_skipped` (images with
      an all-zero heatmap or no box); `num_images`.
    """
    return evaluate_models(
        {"model": model},
        dataset,
        augmentation_seed=augmentation_seed,
        auc_steps=auc_steps,
        max_batches=max_batches,
        max_images=max_images,
        progress=progress,
        augmentation=augmentation,
        dataset_size=dataset_size,
    )["model"]


def compare_models(
    model,
    other,
    dataset,
    names=("model", "compare"),
    augmentation_seed=0,
    auc_steps=metrics_lib.DEFAULT_AUC_STEPS,
    max_batches=None,
    max_images=None,
    progress=True,
    augmentation=None,
    dataset_size=None,
):
    """Evaluates two models on the same images and transforms; paired differences.

    Args:
      model, other: models as in `evaluate_model`.
      names: two distinct str, the models' names in the result.
      other arguments: as in `evaluate_models`.

    Returns:
      dict: "models": name -> metrics dict; "difference": metric -> dict with
      "mean" (other - model, paired over the images both were measured on, so for
      CH it can differ from the difference of the two means), "count" (those
      images), "standard_error" (of that mean; None with fewer than 2 images) and
      "better" (the name of the better model, or "tie").
    """
    if len(names) != 2 or names[0] == names[1]:
        raise ValueError(f"`names` must be two distinct names; received {names!r}")
    results, per_image = evaluate_models(
        {names[0]: model, names[1]: other},
        dataset,
        augmentation_seed=augmentation_seed,
        auc_steps=auc_steps,
        max_batches=max_batches,
        max_images=max_images,
        progress=progress,
        augmentation=augmentation,
        return_per_image=True,
        dataset_size=dataset_size,
    )
    difference = evaluation_summary.paired_differences(
        per_image[names[0]], per_image[names[1]], names
    )
    return {"models": results, "difference": difference}


def evaluate_consistency(models, dataset, augmentation, augmentation_seed=0, max_images=None,
                         progress=True, dataset_size=None):
    """Consistency only, for T drawn from `augmentation` (e.g. a training run's crop areas).

    The same images as `evaluate_models` with the same `dataset`; the transforms
    T differ from its paper-area ones, so the two are reported side by side.

    Args:
      models: dict name -> model (as in `evaluate_models`).
      dataset: batches as in `evaluate_models`.
      augmentation: `cgc_tf.PairedAugmentation`, e.g. `PairedAugmentation(
        area_range=(transform_min_area, 1.0))`.
      augmentation_seed: int, seeds T.
      max_images: optional int >= 1.
      progress, dataset_size: as in `evaluate_models` (the only metric is
        CONSISTENCY_STAGE).

    Returns:
      dict name -> {"consistency_cosine": float, "consistency_pearson": float,
      "count": int}.
    """
    _check_limits(max_images=max_images, dataset_size=dataset_size)
    explainers = {name: as_explainer(model) for name, model in models.items()}
    augmentation = metrics_lib.seeded_augmentation(augmentation, augmentation_seed)
    values = {name: ([], []) for name in models}
    num_images = 0
    progress = evaluation_progress.Progress(progress, "Consistency at the given transforms")
    try:
        for images, _, _, transform, transformed, done in _capped_batches(
            dataset, augmentation, progress, None, max_images, dataset_size
        ):
            for name, explainer in explainers.items():
                cosine, pearson = metrics_lib.consistency(
                    explainer, images, augmentation=augmentation, transform=transform,
                    transformed_images=transformed,
                )
                values[name][0].append(cosine.numpy())
                values[name][1].append(pearson.numpy())
                progress.report(_stage_name(name, CONSISTENCY_STAGE, len(models) > 1), done)
            num_images = done
    finally:
        progress.close()
    if num_images == 0:
        raise ValueError("the dataset yielded no images to evaluate")
    return {
        name: {
            "consistency_cosine": float(np.mean(np.concatenate(cosines))),
            "consistency_pearson": float(np.mean(np.concatenate(pearsons))),
            "count": num_images,
        }
        for name, (cosines, pearsons) in values.items()
    }
