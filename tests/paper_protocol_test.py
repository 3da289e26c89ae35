"""cgc_tf.paper_protocol on hand-computed oracles (annotated folders: annotated_test.py).

tests/reference_evaluation_parity_test.py checks the same functions against the
reference's own code (torch); these run without it.
"""

import tempfile

import keras
import numpy as np
import scipy.ndimage
import tensorflow as tf

from cgc_tf import backbones
from cgc_tf import paper_protocol
from cgc_tf.data import annotated
from tests import testing_base

CLASS_NAMES = ["n001", "n002", "n003"]
MEAN = np.asarray(backbones.IMAGENET_MEAN, np.float32)


class ResizeTest(tf.test.TestCase):

    def test_short_side_size_truncates_the_long_side_like_torchvision(self):
        self.assertEqual(paper_protocol.short_side_size(30, 40, 448), (448, 597))
        self.assertEqual(paper_protocol.short_side_size(40, 30, 448), (597, 448))
        self.assertEqual(paper_protocol.short_side_size(10, 10, 4), (4, 4))

    def test_resize_keeps_8_bit_levels_and_returns_same_size_unchanged(self):
        levels = np.random.default_rng(0).integers(0, 256, (1, 6, 8, 3))
        images = (levels / 255.0).astype(np.float32)
        self.assertAllEqual(paper_protocol.resize_image(images, (6, 8)), images)
        resized = paper_protocol.resize_image(images, (9, 12)).numpy() * 255
        self.assertAllClose(resized, np.round(resized), atol=1e-4)
        # Half-pixel bilinear, clamped at the borders: [0, 255] -> [0, 63.75, 191.25, 255].
        ramp = np.array([[[[0.0] * 3, [1.0] * 3]]], np.float32)
        self.assertAllClose(paper_protocol.resize_image(ramp, (1, 4))[0, 0, :, 0] * 255,
                            [0, 64, 191, 255], atol=1e-4)
        # A constant image stays constant.
        flat = paper_protocol.resize_image(np.full((1, 5, 7, 3), 0.4, np.float32), (11, 3))
        self.assertAllClose(flat, np.full((1, 11, 3, 3), np.round(0.4 * 255) / 255), atol=1e-6)


class ContentHeatmapTest(tf.test.TestCase):

    def test_hand_computed_1x2_cam_on_a_1x4_image(self):
        # [1, 3] -> [0.25, 0.75] (+1e-8) -> half-pixel bilinear to 4 columns:
        # [0.25, 0.375, 0.625, 0.75] / 2; columns 3-4 (1-based) hold 0.6875.
        cams = np.array([[[1.0, 3.0]]], np.float32)
        box = np.array([[[0.0, 0.5, 1.0, 1.0]]], np.float32)
        percent, zero = paper_protocol.content_heatmap(cams, box, (1, 4))
        self.assertAllClose(percent, [68.75], atol=1e-4)
        self.assertAllEqual(zero, [False])

    def test_overlapping_boxes_count_once_and_zero_cams_are_uniform(self):
        cams = np.array([[[1.0, 3.0]], [[0.0, 0.0]]], np.float32)
        boxes = np.array([[[0, 0, 1, 0.75], [0, 0.5, 1, 1]], [[0, 0, 1, 0.25], [-1, -1, -1, -1]]],
                         np.float32)
        percent, zero = paper_protocol.content_heatmap(cams, boxes, (1, 4))
        self.assertAllClose(percent, [100.0, 25.0], atol=1e-4)
        self.assertAllEqual(zero, [False, True])


class RiseTest(tf.test.TestCase):

    def test_blur_kernel_is_scipys_gaussian_filter_of_a_delta(self):
        delta = np.zeros((11, 11))
        delta[5, 5] = 1.0
        expected = scipy.ndimage.gaussian_filter(delta, 5.0)
        self.assertAllClose(paper_protocol.rise_blur_kernel(), expected, atol=1e-7)
        self.assertAllClose(paper_protocol.rise_blur_kernel().sum(), 1.0, atol=1e-6)

    def test_blur_pads_with_the_mean_colour(self):
        images = np.full((1, 12, 12, 3), 0.9, np.float32)
        blurred = paper_protocol.rise_blur(images).numpy()
        self.assertAllClose(blurred[0, 5:7, 5:7], np.full((2, 2, 3), 0.9), atol=1e-6)
        # The corner sees the kernel's lower-right quarter of the image, the rest is mean.
        inside = paper_protocol.rise_blur_kernel()[5:, 5:].sum()
        self.assertAllClose(blurred[0, 0, 0], MEAN + (0.9 - MEAN) * inside, atol=1e-6)

    def test_saliency_order_is_reversed_stable_argsort(self):
        # np.flip(np.argsort([1, 0, 0, 1], stable)) = [3, 0, 2, 1].
        ranks = paper_protocol.saliency_ranks(np.array([[[1.0, 0.0], [0.0, 1.0]]]))
        self.assertAllEqual(ranks, [[1, 3, 2, 0]])

    def test_curves_of_a_model_free_score_on_four_pixels(self):
        # logits = [sum of red, 0]: p(class 0) = sigmoid(sum of red).
        def logits_fn(images):
            red = tf.reduce_sum(images[..., 0], axis=[1, 2])
            return tf.stack([red, tf.zeros_like(red)], axis=-1)

        images = np.array([[[[0.9, 0, 0], [0.1, 0, 0]], [[0.5, 0, 0], [0.3, 0, 0]]]], np.float32)
        saliency = np.array([[[0.2, 0.9], [0.4, 0.1]]], np.float32)  # order: 1, 2, 0, 3
        insertion, deletion, scored = paper_protocol.rise_curves(
            logits_fn, images, saliency, pixels_per_step=3
        )
        self.assertAllEqual(scored, [0])  # predicted: sigmoid(1.8) > 0.5
        red = images[0, ..., 0].reshape(-1)
        blurred = paper_protocol.rise_blur(images).numpy()[0, ..., 0].reshape(-1)
        first_three = np.array([True, True, True, False])[[2, 0, 1, 3]]  # pixels 0, 1, 2
        sigmoid = lambda value: 1.0 / (1.0 + np.exp(-value))  # noqa: E731
        self.assertAllClose(insertion[0], [
            sigmoid(blurred.sum()),
            sigmoid(np.where(first_three, red, blurred).sum()),
            sigmoid(red.sum()),
        ], atol=1e-6)
        self.assertAllClose(deletion[0], [
            sigmoid(red.sum()),
            sigmoid(np.where(first_three, MEAN[0], red).sum()),
            sigmoid(4 * MEAN[0]),
        ], atol=1e-6)

    def test_auc_is_rises_trapezoid(self):
        self.assertAllClose(paper_protocol.rise_auc([[1.0, 0.5, 0.0], [0.0, 1.0, 1.0]]),
                            [0.5, 0.75])

    def test_default_steps(self):
        self.assertEqual(paper_protocol.default_pixels_per_step(224, 224), 1792)
        self.assertEqual(paper_protocol.default_pixels_per_step(32, 32), 37)  # 28 steps


def _constant_model(image_size=16, num_classes=4):
    """Zero features and zero logits: every Grad-CAM is zero, every softmax uniform."""
    inputs = keras.Input((image_size, image_size, 3))
    features = keras.layers.Conv2D(4, 3, padding="same", kernel_initializer="zeros",
                                   activation="relu", name="features")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    logits = keras.layers.Dense(num_classes, kernel_initializer="zeros")(pooled)
    return keras.Model(inputs, logits)


class EvaluatePaperTest(tf.test.TestCase):

    def _examples(self, root, full_boxes):
        sizes = [(20, 14), (20, 14), (9, 23)]
        for index, (width, height) in enumerate(sizes):
            box = (1, 1, width, height) if full_boxes else (1, 1, width // 2, height)
            testing_base.write_voc_image(
                root, f"image{index}", width, height, [("n002", *box)], seed=index
            )
        return list(annotated.voc_folder_examples(root, CLASS_NAMES))

    def test_zero_cams_score_the_box_area_and_uniform_scores_give_constant_curves(self):
        with tempfile.TemporaryDirectory() as root:
            examples = self._examples(root, full_boxes=False)
        from cgc_tf import evaluation

        # The layer is named: the automatic choice needs a class score that depends
        # on the features, which this all-zero model's does not.
        calls = []
        result = paper_protocol.evaluate_paper(
            evaluation.Explainer(_constant_model(), "features"), examples, input_resize=24,
            transform_min_area=0.5, batch_size=2,
            progress=lambda *call: calls.append(call),
        )
        # Batches of one image size: the two 20x14 images, then the 9x23 one.
        stages = ("content heatmap", "insertion/deletion", "consistency")
        self.assertEqual(calls, [(stage, done, 3) for done in (2, 3) for stage in stages])
        self.assertEqual(result["protocol"], "paper")
        self.assertEqual(result["num_images"], 3)
        self.assertEqual(result["content_heatmap_zero_cams"], 3)
        # Uniform maps: the left half of the columns (10 of 20, 4 of 9).
        self.assertAllClose(result["content_heatmap_percent"], (50 + 50 + 400 / 9) / 3, atol=1e-3)
        self.assertAllClose(result["insertion_auc"], 0.25, atol=1e-6)
        self.assertAllClose(result["deletion_auc"], 0.25, atol=1e-6)
        self.assertEqual(result["auc_steps"], 26)  # 10 of 256 pixels per step
        self.assertEqual(result["training_transform_area"], [0.5, 1.0])
        for name in ("paper", "training"):
            self.assertIn(f"consistency_cosine_{name}_transforms", result)

    def test_a_trained_shape_model_has_all_mass_inside_full_image_boxes(self):
        keras.utils.set_random_seed(0)
        backbone, target_layer = backbones.build("small_resnet", (16, 16, 3), 3)
        with tempfile.TemporaryDirectory() as root:
            examples = self._examples(root, full_boxes=True)
        from cgc_tf import evaluation

        result = paper_protocol.evaluate_paper(
            evaluation.Explainer(backbone, target_layer), examples, input_resize=40,
            progress=False, max_images=2,
        )
        self.assertEqual(result["num_images"], 2)
        self.assertAllClose(result["content_heatmap_percent"], 100.0, atol=1e-3)
        self.assertNotIn("training_transform_area", result)
        self.assertBetween(result["insertion_auc"], 0.0, 1.0)

    def test_a_model_that_needs_its_input_size_is_refused_clearly(self):
        from cgc_tf import evaluation
        from tests import testing_models

        with tempfile.TemporaryDirectory() as root:
            examples = self._examples(root, full_boxes=True)
        model = evaluation.Explainer(testing_models.tiny_convnet_flatten_head(image_size=16))
        with self.assertRaisesRegex(ValueError, "needs a global pooling head"):
            paper_protocol.evaluate_paper(model, examples, input_resize=24, progress=False)


if __name__ == "__main__":
    tf.test.main()
