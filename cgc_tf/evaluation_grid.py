"""The evaluation grid: x, cam(x), T(x), cam(T(x)) and T(cam(x)) of several models on one T.

`grid_explanations` computes the heatmaps on one shared transform T;
`save_grid` draws them with `cgc_tf.visualize.consistency_grid` (grid.png of
cgc-evaluate). Images are float32 [N, H, W, 3] in [0, 1].
"""

import numpy as np
import tensorflow as tf

from cgc_tf import metrics as metrics_lib
from cgc_tf import model_loading
from cgc_tf import visualize


def grid_explanations(models, images, augmentation_seed=0, augmentation=None):
    """Heatmaps for the evaluation grid, on one shared T.

    Args:
      models: dict name -> model (as in `cgc_tf.evaluation.evaluate_models`).
      images: float32 [N, H, W, 3] in [0, 1].
      augmentation_seed, augmentation: as in `cgc_tf.evaluation.evaluate_models`.

    Returns:
      (transformed images float32 [N, H, W, 3], dict name -> dict of numpy arrays:
      "heatmap" cam(x), "transformed_heatmap" cam(T(x)), "warped_heatmap" T(cam(x))
      (float32 [N, H, W], predicted class of x), "class_id" int32 [N], "cosine"
      float32 [N] and "captions").
    """
    images = tf.cast(tf.convert_to_tensor(images), tf.float32)
    explainers = {name: model_loading.as_explainer(model) for name, model in models.items()}
    model_loading.check_batch(images, tf.zeros([1], tf.int32), explainers)
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
      augmentation_seed, augmentation: as in `cgc_tf.evaluation.evaluate_models`.
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
