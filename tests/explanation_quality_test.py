"""Tests of cgc_tf/explanation_quality.py: the per-model means of the explanation metrics
and the insertion/deletion curves figure."""

import os
from unittest import mock

import numpy as np
import tensorflow as tf
from PIL import Image

from cgc_tf import explainers
from cgc_tf import explanation_metrics
from cgc_tf import explanation_quality
from cgc_tf import visualize
from cgc_tf.model_loading import Explainer
from tests import testing_models

IMAGE_SIZE = 8


class _FixedExplainer:
    """Heatmap: one hot pixel at (0, 0), whatever the input; logits: a constant row.

    Like a SavedModelExplainer it has no `model`, so no randomisation check.
    """

    def __init__(self, logits):
        self._logits = tf.constant([logits], tf.float32)

    def explain(self, images, class_index=None):
        heatmap = tf.scatter_nd([[0, 0]], [1.0], [IMAGE_SIZE, IMAGE_SIZE])
        return {"heatmap": tf.tile(heatmap[None], [tf.shape(images)[0], 1, 1])}

    def logits(self, images):
        return tf.tile(self._logits, [tf.shape(images)[0], 1])


def _images(count=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(count, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


class ExplanationQualityTest(tf.test.TestCase):

    def test_closed_forms_of_an_input_independent_explainer(self):
        # softmax([0, log 3]) = (0.25, 0.75): the explained classes 0 and 1 score
        # 0.25 and 0.75 at every ROAD step, whatever is imputed.
        explainer = _FixedExplainer([0.0, np.log(3.0)])
        results = explanation_quality.explanation_quality(
            explainer, _images(), [0, 1], sensitivity_radius=0.1, sensitivity_samples=2,
            randomization_layers=2, road_fractions=(0.25, 0.75), seed=3,
        )
        # Gini of one non-zero pixel among n = 64: (n - 1) / n (up to the 1e-7 offset).
        self.assertAllClose(results["sparseness_gini"], 63 / 64, rtol=1e-5)
        self.assertEqual(results["max_sensitivity"], 0.0)  # the heatmap never moves
        self.assertEqual(results["max_sensitivity_radius"], 0.1)
        self.assertEqual(results["road_fractions"], [0.25, 0.75])
        self.assertAllClose(results["road_morf"], 0.5, atol=1e-6)
        self.assertAllClose(results["road_lerf"], 0.5, atol=1e-6)
        self.assertAllClose(results["road_gap"], 0.0, atol=1e-6)
        self.assertEqual(results["quality_images"], 2)
        self.assertNotIn("randomization_spearman", results)  # no Keras model to randomise

    def test_zero_samples_skip_max_sensitivity(self):
        results = explanation_quality.explanation_quality(
            _FixedExplainer([0.0, 0.0]), _images(), [0, 1], sensitivity_samples=0,
            road_fractions=(0.5,),
        )
        self.assertNotIn("max_sensitivity", results)
        self.assertNotIn("max_sensitivity_radius", results)
        self.assertAllClose(results["road_morf"], 0.5, atol=1e-6)

    def test_a_keras_model_gets_the_means_of_the_metric_functions(self):
        model = testing_models.tiny_convnet(image_size=IMAGE_SIZE, num_classes=3)
        explainer = Explainer(model, "features")
        images, labels = _images(), np.array([0, 2])
        results = explanation_quality.explanation_quality(
            explainer, images, labels, sensitivity_samples=2, randomization_layers=2,
            road_fractions=(0.5,), seed=1,
        )
        heatmaps = explainer.explain(images, class_index=labels)["heatmap"]
        self.assertAllClose(
            results["sparseness_gini"], np.mean(explanation_metrics.sparseness(heatmaps))
        )
        steps = explanation_metrics.randomization_sanity(
            model,
            lambda m, batch, c: explainers.explain(m, batch, c, target_layer="features"),
            images, labels, seed=1, max_layers=2,
        )
        # The two top layers with weights, top first: the logits, then conv2.
        self.assertEqual(results["randomization_layers"], ["logits", "conv2"])
        self.assertEqual([name for name, _ in steps], ["logits", "conv2"])
        self.assertAllClose(
            results["randomization_spearman"], [np.mean(value) for _, value in steps], atol=1e-6
        )
        sensitivity = explanation_metrics.max_sensitivity(
            lambda batch, c: explainer.explain(batch, class_index=c)["heatmap"],
            images, labels, explanation_quality.DEFAULT_SENSITIVITY_RADIUS, 2, seed=1,
        )
        self.assertAllClose(results["max_sensitivity"], np.mean(sensitivity))
        road = explanation_metrics.road(
            lambda batch: tf.nn.softmax(explainer.logits(batch)), images, heatmaps, labels,
            (0.5,), seed=1,
        )
        self.assertAllClose(results["road_morf"], np.mean(road["morf"]))
        self.assertAllClose(results["road_lerf"], np.mean(road["lerf"]))
        self.assertAllClose(results["road_gap"], results["road_lerf"] - results["road_morf"])


class InsertionDeletionCurvesTest(tf.test.TestCase):

    def test_mean_curves_of_each_model_are_drawn(self):
        path = os.path.join(self.get_temp_dir(), "curves", "curves.png")
        explainers_by_name = {
            "quarter": _FixedExplainer([0.0, np.log(3.0)]),
            "half": _FixedExplainer([0.0, 0.0]),
        }
        with mock.patch.object(
            visualize, "save_curves", wraps=visualize.save_curves
        ) as save_curves:
            written = explanation_quality.save_insertion_deletion_curves(
                path, explainers_by_name, _images(), [0, 0], steps=4
            )
        self.assertEqual(written, path)
        with Image.open(path) as image:
            self.assertEqual(image.format, "PNG")
        (_, fractions, curves), keywords = save_curves.call_args
        self.assertAllClose(fractions, [0.0, 0.25, 0.5, 0.75, 1.0])
        self.assertEqual(list(curves), ["quarter", "half"])
        # Constant logits: the class-0 probability at every step, both curves.
        for name, probability in (("quarter", 0.25), ("half", 0.5)):
            insertion, deletion = curves[name]
            self.assertAllClose(insertion, [probability] * 5, atol=1e-6)
            self.assertAllClose(deletion, [probability] * 5, atol=1e-6)
        self.assertEqual(keywords["title"], "insertion / deletion, mean of 2 images")
        with self.assertRaisesRegex(ValueError, "steps"):
            explanation_quality.save_insertion_deletion_curves(
                path, explainers_by_name, _images(), [0, 0], steps=0
            )


if __name__ == "__main__":
    tf.test.main()
