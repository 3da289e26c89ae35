"""Sparseness, max-sensitivity, ROAD and the randomisation sanity check on hand-computed cases."""

import numpy as np
import tensorflow as tf

import cgc_tf
from cgc_tf import explanation_metrics
from cgc_tf import metrics
from tests import testing_models


class SparsenessTest(tf.test.TestCase):
    def test_gini_by_hand(self):
        heatmaps = tf.constant(
            [[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 5.0]], [[0.0, 3.0], [1.0, 0.0]]]
        )
        # Sorted [0, 0, 1, 3]: (-3*0 - 1*0 + 1*1 + 3*3) / (4 * 4) = 0.625.
        self.assertAllClose(explanation_metrics.sparseness(heatmaps), [0.0, 0.75, 0.625], atol=1e-6)
        self.assertIs(metrics.sparseness, explanation_metrics.sparseness)


class MaxSensitivityTest(tf.test.TestCase):
    def test_largest_relative_change_of_the_recorded_perturbations(self):
        images = tf.random.stateless_uniform([2, 4, 4, 3], seed=[1, 2])
        seen = []

        def explainer(x, class_index):
            seen.append(x.numpy())
            return 3.0 * x[..., 0]

        score = explanation_metrics.max_sensitivity(
            explainer, images, tf.constant([0, 1]), radius=0.1, num_samples=4
        )
        reference = seen[0][..., 0].reshape(2, -1)
        changes = [
            np.linalg.norm(x[..., 0].reshape(2, -1) - reference, axis=1)
            / np.linalg.norm(reference, axis=1)
            for x in seen[1:]
        ]
        self.assertLen(seen, 5)
        self.assertAllClose(score, np.max(changes, axis=0), rtol=1e-5)
        # Uniform noise of radius 0.1: never beyond 0.1 per pixel.
        self.assertLessEqual(np.max(np.abs(seen[1] - images.numpy())), 0.1 + 1e-6)

    def test_constant_explainer_is_insensitive(self):
        images = tf.random.stateless_uniform([2, 4, 4, 3], seed=[1, 2])
        score = explanation_metrics.max_sensitivity(
            lambda x, c: tf.ones([2, 4, 4]), images, tf.constant([0, 1])
        )
        self.assertAllEqual(score, [0.0, 0.0])


class RoadTest(tf.test.TestCase):
    def test_imputation_by_hand(self):
        image = np.arange(9, dtype=np.float32).reshape(3, 3, 1) ** 2
        centre = np.zeros((3, 3), bool)
        centre[1, 1] = True
        expected = sum(
            weight * image[1 + dr, 1 + dc, 0]
            for (dr, dc), weight in explanation_metrics.ROAD_NEIGHBOURS
        )
        result = explanation_metrics.noisy_linear_imputation(image, centre, noise=0.0)
        self.assertAllClose(result[1, 1, 0], expected)
        corner = np.zeros((3, 3), bool)
        corner[0, 0] = True
        result = explanation_metrics.noisy_linear_imputation(image, corner, noise=0.0)
        self.assertAllClose(
            result[0, 0, 0], (image[0, 1, 0] / 6 + image[1, 0, 0] / 6 + image[1, 1, 0] / 12) / (5 / 12)
        )
        self.assertAllEqual(result[corner == 0], image[corner == 0])
        # Two unknowns between a and b on one row: linear interpolation.
        row = np.array([[[3.0], [0.0], [0.0], [9.0]]])
        result = explanation_metrics.noisy_linear_imputation(
            row, np.array([[False, True, True, False]]), noise=0.0
        )
        self.assertAllClose(result[0, :, 0], [3.0, 5.0, 7.0, 9.0])

    def test_noise_only_on_removed_pixels(self):
        image = np.ones((4, 4, 2), np.float32)
        removed = np.zeros((4, 4), bool)
        removed[1:3, 1:3] = True
        result = explanation_metrics.noisy_linear_imputation(image, removed, noise=0.01, seed=3)
        self.assertAllEqual(result[~removed], image[~removed])
        self.assertAllClose(result[removed], image[removed], atol=0.05)
        self.assertGreater(np.abs(result[removed] - 1.0).max(), 0.0)

    def test_morf_and_lerf_by_hand(self):
        # One row [0, 1, 1, 0]; the "model" predicts class 0 with the mean pixel value.
        images = np.array([[[[0.0], [1.0], [1.0], [0.0]]]], np.float32)
        heatmaps = np.array([[[0.1, 0.9, 0.8, 0.2]]])

        def predict(x):
            mean = tf.reduce_mean(x, axis=[1, 2, 3])
            return tf.stack([mean, 1.0 - mean], axis=-1)

        result = explanation_metrics.road(
            predict, images, heatmaps, [0], fractions=(0.25, 0.5), noise=0.0
        )
        # MoRF: [0, .5, 1, 0] then [0, 0, 0, 0]; LeRF: [1, 1, 1, 0] then [1, 1, 1, 1].
        self.assertAllClose(result["morf"], [[0.375, 0.0]])
        self.assertAllClose(result["lerf"], [[0.75, 1.0]])
        self.assertAllClose(result["fractions"], [0.25, 0.5])

    def test_fractions_validated(self):
        with self.assertRaisesRegex(ValueError, r"fractions=\[1.0\]"):
            explanation_metrics.road(None, np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2)), [0], (1.0,))


class RandomizationSanityTest(tf.test.TestCase):
    def test_spearman_by_hand(self):
        first = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
        second = [[3.0, 2.0, 1.0], [0.0, 0.0, 2.0], [1.0, 2.0, 3.0]]
        self.assertAllClose(explanation_metrics.spearman(first, second), [-1.0, 1.0, 0.0])

    def test_cascade_from_the_top_and_model_left_unchanged(self):
        model = testing_models.tiny_convnet(batch_norm=False)
        weights = [w.copy() for w in model.get_weights()]
        images = tf.random.stateless_uniform([3, 16, 16, 3], seed=[5, 6])
        classes = tf.constant([0, 1, 2])

        def explain(m, x, c):
            return cgc_tf.explain(m, x, c, target_layer="features")

        steps = explanation_metrics.randomization_sanity(model, explain, images, classes)
        self.assertEqual([name for name, _ in steps], ["logits", "conv2", "conv1"])
        for actual, expected in zip(model.get_weights(), weights):
            self.assertAllEqual(actual, expected)
        # Grad-CAM depends on the weights: fully randomised, its maps are unrelated.
        self.assertLess(float(np.mean(steps[-1][1])), 0.9)
        # A model-independent "explanation" fails the check: correlation 1 at every step.
        edge = explanation_metrics.randomization_sanity(
            model, lambda m, x, c: x[..., 0], images, classes, max_layers=2
        )
        self.assertLen(edge, 2)
        for _, correlations in edge:
            self.assertAllClose(correlations, [1.0, 1.0, 1.0])


if __name__ == "__main__":
    tf.test.main()
