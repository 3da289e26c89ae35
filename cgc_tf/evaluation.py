"""Evaluate explanations of one or several models over a dataset.

`evaluate_model` runs every metric of `cgc_tf.metrics` batch by batch and returns a
flat dict of means and counts (written as metrics.json by `cgc-evaluate` and by
training). `compare_models` evaluates two models in one pass over the same images
with the same transforms T and adds their paired differences. `save_grid` draws the
evaluation grid of `cgc_tf.visualize.consistency_grid`.

Heatmaps for Content Heatmap, pointing game and insertion/deletion are Grad-CAM of
the ground-truth class (docs/method.md); consistency uses the predicted class of x for
both x and T(x), as training does.

This is the "cgc_tf" protocol (centre-cropped views at the model's input size);
`cgc_tf.paper_protocol` is the reference code's ("paper"). docs/evaluation.md
compares them.
"""

import json
import math
import os

import keras
import numpy as np
import tensorflow as tf

from cgc_tf import metrics as metrics_lib
from cgc_tf import model_dir as layout
from cgc_tf import visualize
from cgc_tf.model import CGCModel

# Metrics measured per image and averaged; the two box metrics need "bbox".
PER_IMAGE_METRICS = (
    "accuracy",
    "content_heatmap_percent",
    "pointing_game",
    "insertion_auc",
    "deletion_auc",
    "consistency_cosine",
    "consistency_pearson",
)
# For comparisons: the direction in which each metric is better.
HIGHER_IS_BETTER = {name: name != "deletion_auc" for name in PER_IMAGE_METRICS}
# This module's protocol, recorded beside its numbers ("paper": cgc_tf.paper_protocol).
PROTOCOL = "cgc_tf"


def as_explainer(model):
    """An `Explainer` for a model, or the model itself if it already is one.

    Args:
      model: `CGCModel`, functional keras classifier, `Explainer` or
        `SavedModelExplainer`.
    """
    if isinstance(model, (Explainer, SavedModelExplainer)):
        return model
    return Explainer(model)


class Explainer:
    """Uniform access to logits and Grad-CAM for a CGCModel or a plain classifier.

    Args:
      model: a `cgc_tf.CGCModel`, or a functional keras classifier (images in
        [0, 1] -> logits), wrapped in a CGCModel with `target_layer`.
      target_layer: Grad-CAM layer of a plain classifier (None:
        `cgc_tf.explainers.auto_target_layer`'s choice);
        must be None for a CGCModel (it has its own).
    """

    def __init__(self, model, target_layer=None):
        if isinstance(model, Explainer):
            model = model.model
        if isinstance(model, CGCModel):
            if target_layer not in (None, model.target_layer):
                raise ValueError(
                    f"target_layer={target_layer!r} given for a CGCModel whose target layer "
                    f"is {model.target_layer!r}; omit target_layer"
                )
        elif isinstance(model, keras.Model):
            model = CGCModel(model, target_layer=target_layer)
        else:
            raise ValueError(
                "`model` must be a cgc_tf.CGCModel or a functional keras.Model classifier; "
                f"received {type(model).__name__}"
            )
        self.model = model
        self.image_size = tuple(model.image_size)
        self.num_classes = int(model.backbone.outputs[0].shape[-1])
        self.logits = tf.function(
            lambda images: model(images, training=False), reduce_retracing=True
        )

    def explain(self, images, class_index=None):
        """`CGCModel.explain`: dict of probabilities, class_id, heatmap."""
        return self.model.explain(images, class_index=class_index)


class SavedModelExplainer:
    """A SavedModel written by `cgc-export`, through its float-input signatures.

    Uses `explain` / `explain_class` for heatmaps and `serving_default` for
    probabilities; `logits` returns log-probabilities, whose softmax is the
    exported probabilities, so the insertion/deletion curves are unchanged.

    Args:
      path: the SavedModel folder (export_dir/<version>).
    """

    REQUIRED_SIGNATURES = ("serving_default", "explain", "explain_class")

    def __init__(self, path):
        loaded = tf.saved_model.load(path)
        missing = [name for name in self.REQUIRED_SIGNATURES if name not in loaded.signatures]
        if missing:
            raise ValueError(
                f"model={path!r} is a SavedModel without the signatures {missing} of "
                f"cgc-export (it has {sorted(loaded.signatures)})"
            )
        self.path = path
        self._loaded = loaded  # keeps the signatures' variables alive
        self._signatures = loaded.signatures
        self.image_size = self.num_classes = None
        if "metadata" in loaded.signatures:
            metadata = json.loads(loaded.signatures["metadata"]()["metadata_json"].numpy())
            size = int(metadata["image_size"])
            self.image_size = (size, size)
            self.num_classes = int(metadata["num_classes"])

    def explain(self, images, class_index=None):
        """dict of probabilities float32 [B, K], class_id int32 [B], heatmap [B, H, W]."""
        images = tf.cast(images, tf.float32)
        if class_index is None:
            return self._signatures["explain"](images=images)
        class_index = tf.cast(class_index, tf.int32)
        return self._signatures["explain_class"](images=images, class_index=class_index)

    def logits(self, images):
        """Log-probabilities float32 [B, K] (floored at 1e-30 to stay finite)."""
        probabilities = self._signatures["serving_default"](images=tf.cast(images, tf.float32))
        return tf.math.log(tf.maximum(probabilities["probabilities"], 1e-30))


def _saved_model_dir(path):
    """`path` or its highest numbered version holding a SavedModel, else None."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = [
        name
        for name in os.listdir(path)
        if name.isdigit() and os.path.isfile(os.path.join(path, name, "saved_model.pb"))
    ]
    if versions:
        return os.path.join(path, max(versions, key=int))
    return None


def load_model(path):
    """Loads a model saved by training, `keras.Model.save` or `cgc-export`.

    Args:
      path: a `.keras` file; a model_dir containing `model.keras`; or a SavedModel
        exported by cgc-export (its version folder, or the export folder, whose
        highest version is used).

    Returns:
      the loaded keras.Model (a CGCModel when training saved it), or a
      `SavedModelExplainer`.

    Raises:
      ValueError: if `path` is none of these.
    """
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, layout.MODEL_FILE)):
        saved_model = _saved_model_dir(path)
        if saved_model is not None:
            return SavedModelExplainer(saved_model)
        found = sorted(os.listdir(path))[:20]
        raise ValueError(
            f"model={path!r} is a directory without {layout.MODEL_FILE} or a SavedModel; pass "
            f"a .keras file, a model_dir written by cgc-train or a cgc-export folder (it "
            f"contains {found})"
        )
    return layout.load_model(path)


def read_model_dir_config(path):
    """The dict of `config.json` beside a model (model_dir or its model.keras), or {}."""
    return layout.read_config(path)


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


def _check_batch(images, labels, explainers):
    """Readable errors for images of the wrong size and labels out of range."""
    size = tuple(images.shape[1:3])
    low, high = int(tf.reduce_min(labels)), int(tf.reduce_max(labels))
    for name, explainer in explainers.items():
        if explainer.num_classes is not None and (low < 0 or high >= explainer.num_classes):
            raise ValueError(
                f"dataset labels span [{low}, {high}] but model {name!r} has "
                f"{explainer.num_classes} classes; evaluate it on the dataset it was trained on"
            )
        if explainer.image_size is not None and size != explainer.image_size:
            raise ValueError(
                f"model {name!r} takes {explainer.image_size[0]}x{explainer.image_size[1]} "
                f"images but the dataset yields {size[0]}x{size[1]}; set image_size to "
                f"{explainer.image_size[0]}"
            )


def _num_batches(dataset, max_batches, max_images, batch_size):
    """The number of batches to evaluate, or None if unknown."""
    limits = [] if max_batches is None else [max_batches]
    if max_images is not None:
        limits.append(math.ceil(max_images / batch_size))
    cardinality = int(dataset.cardinality()) if hasattr(dataset, "cardinality") else -1
    if cardinality >= 0:
        limits.append(cardinality)
    return min(limits) if limits else None


def _batch_metrics(explainer, images, labels, boxes, augmentation, transform, transformed, steps):
    """Per-image metric values of one batch for one model: name -> (values, valid)."""
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
    insertion, deletion = metrics_lib.insertion_deletion_auc(
        explainer.logits, images, heatmaps, labels, steps=steps
    )
    values["insertion_auc"] = (insertion, None)
    values["deletion_auc"] = (deletion, None)
    cosine, pearson = metrics_lib.consistency(
        explainer,
        images,
        augmentation=augmentation,
        transform=transform,
        transformed_images=transformed,
    )
    values["consistency_cosine"] = (cosine, None)
    values["consistency_pearson"] = (pearson, None)
    return values


def balanced_accuracy(correct, labels):
    """Mean over the classes present in `labels` of the accuracy within each class.

    The accuracy a classifier gets when every class weighs the same, however
    imbalanced the evaluation set (sklearn's `balanced_accuracy_score`).

    Args:
      correct: float or bool [N], 1 where the prediction is right.
      labels: int [N], the ground-truth class of each image.

    Returns:
      float, or None when N = 0.
    """
    correct = np.asarray(correct, np.float64).reshape([-1])
    labels = np.asarray(labels).reshape([-1])
    if correct.size == 0:
        return None
    return float(np.mean([correct[labels == label].mean() for label in np.unique(labels)]))


def _summarize(per_image, labels, num_images, skipped):
    """Flat dict: metric -> mean (None without data), metric_count -> images used."""
    result = {}
    for name in PER_IMAGE_METRICS:
        values = np.concatenate(per_image[name]) if per_image[name] else np.zeros([0])
        values = values[~np.isnan(values)]
        result[name] = float(np.mean(values)) if values.size else None
        result[f"{name}_count"] = int(values.size)
    correct = np.concatenate(per_image["accuracy"]) if per_image["accuracy"] else np.zeros([0])
    result["balanced_accuracy"] = balanced_accuracy(correct, labels)
    result["content_heatmap_skipped"] = int(skipped)
    result["num_images"] = int(num_images)
    return result


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
      progress: show a keras Progbar.
      augmentation: `cgc_tf.PairedAugmentation` for T; None for the paper's
        random resized crop + flip.
      return_per_image: also return the per-image values (for paired statistics).

    Returns:
      dict name -> metrics dict (see `evaluate_model`); with `return_per_image`, a
      pair (that dict, dict name -> metric -> float32 [num_images] per-image values,
      NaN where the metric does not apply, e.g. CH of an all-zero heatmap).
    """
    if not isinstance(models, dict) or not models:
        raise ValueError(f"`models` must be a non-empty dict name -> model; received {models!r}")
    for argument, value in (("max_batches", max_batches), ("max_images", max_images)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"`{argument}` must be None or an int >= 1; received {value!r}")
    explainers = {name: as_explainer(model) for name, model in models.items()}
    augmentation = metrics_lib.seeded_augmentation(augmentation, augmentation_seed)
    per_image = {name: {metric: [] for metric in PER_IMAGE_METRICS} for name in models}
    all_labels = []
    skipped = {name: 0 for name in models}
    num_images = 0
    progress_bar = None
    batches_done = 0
    for batch_index, batch in enumerate(dataset):
        if max_batches is not None and batch_index >= max_batches:
            break
        if max_images is not None and num_images >= max_images:
            break
        images, labels, boxes = _unpack_batch(batch)
        if max_images is not None and num_images + images.shape[0] > max_images:
            keep = max_images - num_images
            images, labels = images[:keep], labels[:keep]
            boxes = None if boxes is None else boxes[:keep]
        _check_batch(images, labels, explainers)
        if progress and progress_bar is None:
            # Created at the first batch, whose size turns max_images into batches.
            # Stateful: Progbar would otherwise show running averages of these values.
            progress_bar = keras.utils.Progbar(
                _num_batches(dataset, max_batches, max_images, int(images.shape[0])),
                stateful_metrics=["images", "accuracy"],
                unit_name="batch",
            )
        transform = augmentation.sample(images.shape[0], images.shape[1], images.shape[2])
        transformed = augmentation.apply_to_images(images, transform)
        for name, explainer in explainers.items():
            values = _batch_metrics(
                explainer, images, labels, boxes, augmentation, transform, transformed, auc_steps
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
        num_images += int(images.shape[0])
        batches_done += 1
        if progress_bar is not None:
            accuracy = np.concatenate(per_image[next(iter(models))]["accuracy"]).mean()
            progress_bar.update(
                batches_done, values=[("images", num_images), ("accuracy", accuracy)]
            )
    if progress_bar is not None and batches_done != progress_bar.target:
        progress_bar.update(batches_done, finalize=True)
    if num_images == 0:
        raise ValueError("the dataset yielded no images to evaluate")
    all_labels = np.concatenate(all_labels)
    results = {
        name: _summarize(per_image[name], all_labels, num_images, skipped[name]) for name in models
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
):
    """Evaluates accuracy and explanations of one model over a dataset.

    Args:
      model: `cgc_tf.CGCModel`, a functional keras classifier (target layer: its
        last 4-D layer; wrap it in `Explainer(model, target_layer)` to choose), or
        an `Explainer`.
      dataset, augmentation_seed, auc_steps, max_batches, progress, max_images,
        augmentation: as in `evaluate_models`.

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
    )
    difference = {}
    for metric in PER_IMAGE_METRICS:
        first = per_image[names[0]][metric].astype(np.float64)
        second = per_image[names[1]][metric].astype(np.float64)
        deltas = second - first
        # Paired over the images both models were measured on (CH skips some).
        deltas = deltas[~np.isnan(deltas)]
        if deltas.size == 0:
            continue
        mean = float(deltas.mean())
        standard_error = (
            float(deltas.std(ddof=1) / math.sqrt(deltas.size)) if deltas.size > 1 else None
        )
        better = "tie"
        if mean != 0:
            better = names[1] if (mean > 0) == HIGHER_IS_BETTER[metric] else names[0]
        difference[metric] = {
            "mean": mean,
            "count": int(deltas.size),
            "standard_error": standard_error,
            "better": better,
        }
    return {"models": results, "difference": difference}


def comparison_table(comparison):
    """A plain-text table of a `compare_models` result, one metric per line.

    The difference is paired (second model minus first) over the images both
    models were measured on; "images" is their number.
    """
    names = list(comparison["models"])
    header = f"{'metric':<26}" + "".join(f"{name:>14}" for name in names)
    header += f"{'difference':>14}{'std. error':>12}{'images':>8}  better"
    lines = [header, "-" * len(header)]
    for metric in PER_IMAGE_METRICS:
        values = [comparison["models"][name][metric] for name in names]
        cells = "".join(f"{'n/a':>14}" if v is None else f"{v:>14.4f}" for v in values)
        difference = comparison["difference"].get(metric)
        if difference is None:
            lines.append(f"{metric:<26}{cells}")
            continue
        error = difference["standard_error"]
        error_cell = f"{'n/a':>12}" if error is None else f"{error:>12.4f}"
        lines.append(
            f"{metric:<26}{cells}{difference['mean']:>+14.4f}{error_cell}"
            f"{difference['count']:>8}  {difference['better']}"
        )
    return "\n".join(lines)


def grid_explanations(models, images, augmentation_seed=0, augmentation=None):
    """Heatmaps for the evaluation grid, on one shared T.

    Args:
      models: dict name -> model (as in `evaluate_models`).
      images: float32 [N, H, W, 3] in [0, 1].
      augmentation_seed, augmentation: as in `evaluate_models`.

    Returns:
      (transformed images float32 [N, H, W, 3], dict name -> dict of numpy arrays:
      "heatmap" cam(x), "transformed_heatmap" cam(T(x)), "warped_heatmap" T(cam(x))
      (float32 [N, H, W], predicted class of x), "class_id" int32 [N], "cosine"
      float32 [N] and "captions").
    """
    images = tf.cast(tf.convert_to_tensor(images), tf.float32)
    explainers = {name: as_explainer(model) for name, model in models.items()}
    _check_batch(images, tf.zeros([1], tf.int32), explainers)
    augmentation = metrics_lib.seeded_augmentation(augmentation, augmentation_seed)
    transform = augmentation.sample(images.shape[0], images.shape[1], images.shape[2])
    transformed = augmentation.apply_to_images(images, transform)
    explanations = {}
    for name, explainer in explainers.items():
        original = explainer.explain(images)
        heatmap = original["heatmap"]
        transformed_heatmap = explainer.explain(transformed, class_index=original["class_id"])[
            "heatmap"
        ]
        warped = augmentation.apply_to_heatmaps(heatmap, transform)
        cosine, _ = metrics_lib.heatmap_agreement(transformed_heatmap, warped)
        explanations[name] = {
            "heatmap": heatmap.numpy(),
            "transformed_heatmap": transformed_heatmap.numpy(),
            "warped_heatmap": warped.numpy(),
            "class_id": original["class_id"].numpy(),
            "cosine": cosine.numpy(),
            "captions": [f"cos {value:.2f}" for value in cosine.numpy()],
        }
    return transformed.numpy(), explanations


def save_grid(
    path, models, images, labels=None, augmentation_seed=0, augmentation=None, boxes=None
):
    """Writes the evaluation grid PNG for the first images of a batch.

    Args:
      path: output PNG path.
      models: dict name -> model; two or more are shown side by side.
      images: float32 [N, H, W, 3] in [0, 1].
      labels: optional int [N], shown with the predictions left of each row.
      augmentation_seed, augmentation: as in `evaluate_models`.
      boxes: optional float32 [N, M, 4] ground-truth boxes drawn on x and cam(x).

    Returns:
      `path`.
    """
    transformed, explanations = grid_explanations(
        models, images, augmentation_seed, augmentation
    )
    row_titles = []
    for index in range(len(transformed)):
        parts = [] if labels is None else [f"label {int(labels[index])}"]
        parts += [
            f"{name + ' ' if len(models) > 1 else ''}pred {int(explanation['class_id'][index])}"
            for name, explanation in explanations.items()
        ]
        row_titles.append("\n".join(parts))
    return visualize.consistency_grid(
        path, np.asarray(images), transformed, explanations, row_titles=row_titles, boxes=boxes
    )


def evaluate_consistency(models, dataset, augmentation, augmentation_seed=0, max_images=None):
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

    Returns:
      dict name -> {"consistency_cosine": float, "consistency_pearson": float,
      "count": int}.
    """
    explainers = {name: as_explainer(model) for name, model in models.items()}
    augmentation = metrics_lib.seeded_augmentation(augmentation, augmentation_seed)
    values = {name: ([], []) for name in models}
    num_images = 0
    for batch in dataset:
        if max_images is not None and num_images >= max_images:
            break
        images, _, _ = _unpack_batch(batch)
        if max_images is not None:
            images = images[: max_images - num_images]
        transform = augmentation.sample(images.shape[0], images.shape[1], images.shape[2])
        transformed = augmentation.apply_to_images(images, transform)
        for name, explainer in explainers.items():
            cosine, pearson = metrics_lib.consistency(
                explainer, images, augmentation=augmentation, transform=transform,
                transformed_images=transformed,
            )
            values[name][0].append(cosine.numpy())
            values[name][1].append(pearson.numpy())
        num_images += int(images.shape[0])
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
