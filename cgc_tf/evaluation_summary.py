"""Summaries of per-image metric values: means and counts, balanced accuracy, comparisons.

`summarize` turns the per-image values of `cgc_tf.evaluation` (NaN where a
metric does not apply) into the flat metrics dict written as metrics.json;
`paired_differences` and `comparison_table` compare two models measured on the
same images.
"""

import math

import numpy as np

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


def summarize(per_image, labels, num_images, skipped):
    """The metrics dict of one model from its per-image values.

    Args:
      per_image: dict metric -> list of float32 [n_i] arrays (NaN: not measured).
      labels: int [N], the ground-truth classes (for the balanced accuracy).
      num_images: int N.
      skipped: int, images Content Heatmap skipped.

    Returns:
      flat dict: metric -> mean (None without data), `<metric>_count` -> images
      used, "balanced_accuracy", "content_heatmap_skipped", "num_images".
    """
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


def paired_differences(first, second, names):
    """Paired differences of two models' per-image values, per metric.

    Args:
      first, second: dict metric -> float32 [N] per-image values of the two
        models on the same images (NaN where a metric does not apply).
      names: the two models' names.

    Returns:
      dict metric -> {"mean" (second - first over the images both were measured
      on), "count", "standard_error" (None with fewer than 2 images), "better"
      (a name, or "tie")}; metrics measured on no common image are left out.
    """
    difference = {}
    for metric in PER_IMAGE_METRICS:
        deltas = second[metric].astype(np.float64) - first[metric].astype(np.float64)
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
    return difference


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
