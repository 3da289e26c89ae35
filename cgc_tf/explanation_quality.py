"""The `cgc_tf.explanation_metrics` of one model on a sample of images, for metrics.json.

`explanation_quality` runs sparseness, max-sensitivity, ROAD and the cascading
randomisation sanity check on the first images of an evaluation set (they cost
more forward passes than the other metrics: ROAD one per fraction and order,
max-sensitivity one per sample, randomisation one per layer) and returns flat
means. Heatmaps are Grad-CAM of the ground-truth class, as for Content Heatmap
and insertion/deletion in `cgc_tf.evaluation`.
"""

import numpy as np
import tensorflow as tf

from cgc_tf import explainers
from cgc_tf import explanation_metrics
from cgc_tf import metrics
from cgc_tf import visualize

DEFAULT_SENSITIVITY_RADIUS = 0.02
DEFAULT_SENSITIVITY_SAMPLES = 5
DEFAULT_RANDOMIZATION_LAYERS = 4


def explanation_quality(
    explainer,
    images,
    labels,
    sensitivity_radius=DEFAULT_SENSITIVITY_RADIUS,
    sensitivity_samples=DEFAULT_SENSITIVITY_SAMPLES,
    randomization_layers=DEFAULT_RANDOMIZATION_LAYERS,
    road_fractions=explanation_metrics.ROAD_FRACTIONS,
    seed=0,
):
    """Sparseness, max-sensitivity, ROAD and randomisation means over `images`.

    Args:
      explainer: `cgc_tf.evaluation.Explainer` or `SavedModelExplainer` (has
        `explain(images, class_index)` and `logits(images)`).
      images: float32 [N, H, W, 3] in [0, 1].
      labels: int [N], the explained classes.
      sensitivity_radius: r of the uniform perturbations, in image units (> 0).
      sensitivity_samples: Monte Carlo draws per image (>= 1; 0 skips the metric).
      randomization_layers: top layers randomised in cascade (0 skips; needs a
        Keras model: skipped for SavedModels).
      road_fractions: ROAD's removal fractions.
      seed: int, seeds the perturbations, imputation noise and random weights.

    Returns:
      dict of floats: sparseness_gini, max_sensitivity, road_morf, road_lerf,
      road_gap (means over images; ROAD curves also averaged over fractions),
      randomization_spearman (list, one mean per cascade step, top layer
      first), randomization_layers (their names), quality_images.
    """
    images = tf.cast(tf.convert_to_tensor(images), tf.float32)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int32)

    def heatmaps_of(batch, class_index):
        return explainer.explain(batch, class_index=class_index)["heatmap"]

    heatmaps = heatmaps_of(images, labels)
    results = {
        "quality_images": int(images.shape[0]),
        "sparseness_gini": float(np.mean(explanation_metrics.sparseness(heatmaps))),
    }
    if sensitivity_samples:
        sensitivity = explanation_metrics.max_sensitivity(
            heatmaps_of, images, labels, sensitivity_radius, sensitivity_samples, seed
        )
        results["max_sensitivity"] = float(np.mean(sensitivity))
        results["max_sensitivity_radius"] = float(sensitivity_radius)
    road = explanation_metrics.road(
        lambda batch: tf.nn.softmax(tf.cast(explainer.logits(batch), tf.float32)),
        images, heatmaps, labels, road_fractions, seed=seed,
    )
    results["road_fractions"] = [float(f) for f in road["fractions"]]
    results["road_morf"] = float(np.mean(road["morf"]))
    results["road_lerf"] = float(np.mean(road["lerf"]))
    results["road_gap"] = results["road_lerf"] - results["road_morf"]
    model = getattr(explainer, "model", None)
    if randomization_layers and model is not None:
        # The model as given: its logits wrapper (`gradcam.logits_model`) cannot be cloned.
        backbone, layer = model.source_backbone, model.target_layer
        steps = explanation_metrics.randomization_sanity(
            backbone,
            lambda m, batch, c: explainers.explain(m, batch, c, target_layer=layer),
            images, labels, seed=seed, max_layers=randomization_layers,
        )
        results["randomization_layers"] = [name for name, _ in steps]
        results["randomization_spearman"] = [float(np.mean(value)) for _, value in steps]
    return results


def save_insertion_deletion_curves(path, explainers_by_name, images, labels, steps):
    """Mean RISE insertion/deletion curves of each model on `images`, drawn to a PNG.

    Args:
      path: the PNG to write.
      explainers_by_name: dict name -> explainer (as `explanation_quality`).
      images: float32 [N, H, W, 3] in [0, 1].
      labels: int [N], the explained classes (Grad-CAM of the label).
      steps: insertion/deletion steps (`cgc_tf.metrics.insertion_deletion_curves`).

    Returns:
      `path`.
    """
    images = tf.cast(tf.convert_to_tensor(images), tf.float32)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    curves = {}
    fractions = None
    for name, explainer in explainers_by_name.items():
        heatmaps = explainer.explain(images, class_index=labels)["heatmap"]
        fractions, insertion, deletion = metrics.insertion_deletion_curves(
            explainer.logits, images, heatmaps, labels, steps=steps
        )
        curves[name] = (np.mean(insertion, axis=0), np.mean(deletion, axis=0))
    return visualize.save_curves(
        path, fractions, curves, title=f"insertion / deletion, mean of {int(images.shape[0])} images"
    )
