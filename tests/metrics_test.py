"""Tests for cgc_tf.metrics: hand-built heatmaps, boxes and models with known answers."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from scipy.signal import windows

import cgc_tf
from cgc_tf import gradcam
from cgc_tf import metrics
from tests import testing_models

PADDING = [-1.0, -1.0, -1.0, -1.0]


def region_model(region, scale=20.0, offset=8.0):
    """model_fn whose class-1 logit is scale * mean(pixels in region) - offset; class 0: 0."""
    top, left, bottom, right = region

    def model_fn(images):
        evidence = tf.reduce_mean(images[:, top:bottom, left:right, :], axis=[1, 2, 3])
        return tf.stack([tf.zeros_like(evidence), scale * evidence - offset], axis=-1)

    return model_fn


def pointwise_model(image_size=8, positional=False, seed=0):
    """1x1 conv -> ReLU -> (optional fixed left-to-right ramp) -> GAP -> Dense.

    Without the ramp every layer before the pooling acts on each pixel alone, so
    Grad-CAM (ReLU(F . W_c) / hw, at the input resolution) commutes exactly with
    flips. The ramp weights the feature map by column, breaking that symmetry.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3))
    features = keras.layers.Conv2D(6, 1, activation="relu", name="pointwise")(inputs)
    if positional:
        ramp = np.linspace(0.05, 1.0, image_size, dtype=np.float32)[None, None, :, None]
        features = keras.layers.Lambda(lambda f: f * ramp, name="ramp")(features)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    logits = keras.layers.Dense(3)(pooled)
    return cgc_tf.CGCModel(keras.Model(inputs, logits))


def flip_only():
    """The full image (area 1, ratio 1 snaps to the whole box), always flipped."""
    return cgc_tf.PairedAugmentation(
        area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), flip_probability=1.0
    )


class ContentHeatmapTest(tf.test.TestCase, parameterized.TestCase):
    def test_known_fractions(self):
        heatmaps = np.zeros((4, 8, 8), np.float32)
        heatmaps[0, :4, :4] = 3.0  # all mass in the box
        heatmaps[1, :, :4] = 1.0  # half of it in the box (left column strip)
        heatmaps[2] = 0.0  # all zero: skipped
        heatmaps[3, 6:, 6:] = 1.0  # all outside
        boxes = np.array(
            [
                [[0.0, 0.0, 0.5, 0.5], PADDING],
                [[0.0, 0.0, 0.5, 0.5], PADDING],
                [[0.0, 0.0, 1.0, 1.0], PADDING],
                [[0.0, 0.0, 0.5, 0.5], PADDING],
            ],
            np.float32,
        )
        percent, valid = metrics.content_heatmap(heatmaps, boxes)
        self.assertAllClose(percent, [100.0, 50.0, 0.0, 0.0])
        self.assertAllEqual(valid, [True, True, False, True])

    def test_union_of_overlapping_boxes_counts_pixels_once(self):
        heatmaps = np.ones((1, 10, 10), np.float32)
        # Columns 0-5 and 4-7 overlap on 4-5: the union is columns 0-7 = 80%.
        boxes = np.array([[[0.0, 0.0, 1.0, 0.6], [0.0, 0.4, 1.0, 0.8], PADDING]], np.float32)
        percent, valid = metrics.content_heatmap(heatmaps, boxes)
        self.assertAllClose(percent, [80.0])
        self.assertAllEqual(valid, [True])

    def test_scale_invariant_and_single_box_rank(self):
        rng = np.random.default_rng(0)
        heatmaps = rng.uniform(size=(3, 12, 12)).astype(np.float32)
        boxes = np.array([[0.1, 0.2, 0.7, 0.9], [0.0, 0.0, 0.3, 0.3], [0.5, 0.5, 1.0, 1.0]])
        percent, _ = metrics.content_heatmap(heatmaps, boxes.astype(np.float32))
        scaled, _ = metrics.content_heatmap(1e3 * heatmaps, boxes[:, None].astype(np.float32))
        self.assertAllClose(percent, scaled, rtol=1e-5)
        mask = metrics.boxes_to_mask(boxes.astype(np.float32), 12, 12).numpy()
        expected = 100.0 * (heatmaps * mask).sum(axis=(1, 2)) / heatmaps.sum(axis=(1, 2))
        self.assertAllClose(percent, expected, rtol=1e-5)

    def test_image_without_box_is_invalid(self):
        heatmaps = np.ones((1, 4, 4), np.float32)
        percent, valid = metrics.content_heatmap(heatmaps, np.array([[PADDING]], np.float32))
        self.assertAllEqual(valid, [False])
        self.assertAllClose(percent, [0.0])

    def test_boxes_to_mask_uses_pixel_centres(self):
        mask = metrics.boxes_to_mask(np.array([[[0.25, 0.5, 0.75, 1.0]]], np.float32), 4, 4)
        expected = np.zeros((1, 4, 4), bool)
        expected[0, 1:3, 2:4] = True
        self.assertAllEqual(mask, expected)

    def test_bad_box_shape_raises(self):
        with self.assertRaisesRegex(ValueError, "boxes"):
            metrics.content_heatmap(np.ones((1, 4, 4)), np.ones((1, 2, 3), np.float32))


class PointingGameTest(tf.test.TestCase):
    def test_hits_and_misses(self):
        heatmaps = np.zeros((3, 8, 8), np.float32)
        heatmaps[0, 1, 1] = 1.0  # peak in the top-left box
        heatmaps[1, 7, 7] = 1.0  # peak outside
        heatmaps[2, 6, 1] = 1.0  # peak in the second box
        boxes = np.array(
            [
                [[0.0, 0.0, 0.5, 0.5], PADDING],
                [[0.0, 0.0, 0.5, 0.5], PADDING],
                [[0.0, 0.0, 0.25, 0.25], [0.5, 0.0, 1.0, 0.5]],
            ],
            np.float32,
        )
        self.assertAllEqual(metrics.pointing_game(heatmaps, boxes), [True, False, True])

    def test_all_zero_heatmap_misses(self):
        boxes = np.array([[[0.0, 0.0, 1.0, 1.0]]], np.float32)
        self.assertAllEqual(metrics.pointing_game(np.zeros((1, 4, 4)), boxes), [False])


class AccuracyTest(tf.test.TestCase):
    def test_per_image_correctness(self):
        logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 1.0]], np.float32)
        self.assertAllEqual(metrics.top1_accuracy(logits, [1, 1, 1]), [1.0, 0.0, 1.0])


class BlurTest(tf.test.TestCase):
    def test_kernel_sums_to_one_and_matches_reference_gaussian(self):
        size = 25
        delta = np.zeros((1, size, size, 1), np.float32)
        delta[0, size // 2, size // 2, 0] = 1.0
        response = metrics.gaussian_blur(delta).numpy()[0, :, :, 0]
        centre, radius = size // 2, metrics.BLUR_KERNEL_SIZE // 2
        window = slice(centre - radius, centre + radius + 1)
        kernel = response[window, window]
        reference = np.outer(
            windows.gaussian(metrics.BLUR_KERNEL_SIZE, std=metrics.BLUR_SIGMA),
            windows.gaussian(metrics.BLUR_KERNEL_SIZE, std=metrics.BLUR_SIGMA),
        )
        reference /= reference.sum()
        self.assertAllClose(kernel, reference, atol=1e-7)
        self.assertAllClose(response.sum(), 1.0, atol=1e-6)
        # Nothing leaks beyond the 11x11 support.
        self.assertAllClose(response.sum(), kernel.sum(), atol=1e-7)

    def test_channels_are_blurred_separately_with_zero_padding(self):
        images = np.zeros((1, 16, 16, 3), np.float32)
        images[..., 1] = 1.0
        blurred = metrics.gaussian_blur(images).numpy()
        self.assertAllClose(blurred[..., 0], np.zeros((1, 16, 16)))
        self.assertAllClose(blurred[0, 8, 8, 1], 1.0, atol=1e-6)  # interior of a constant
        self.assertLess(blurred[0, 0, 0, 1], 0.5)  # zero padding darkens the corner

    def test_bad_kernel_size_raises(self):
        with self.assertRaisesRegex(ValueError, "kernel_size"):
            metrics.gaussian_blur(np.zeros((1, 4, 4, 3)), kernel_size=4)


class InsertionDeletionTest(tf.test.TestCase, parameterized.TestCase):
    size = 16
    region = (4, 4, 8, 8)  # top, left, bottom, right

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        images = rng.uniform(0.0, 0.3, size=(2, self.size, self.size, 3)).astype(np.float32)
        top, left, bottom, right = self.region
        images[:, top:bottom, left:right, :] = 1.0
        self.images = images
        self.model_fn = region_model(self.region)
        self.class_index = np.array([1, 1], np.int32)

    def _heatmap(self, kind):
        top, left, bottom, right = self.region
        rng = np.random.default_rng(1)
        heatmap = np.zeros((self.size, self.size), np.float32)
        if kind == "exact":
            heatmap[top:bottom, left:right] = 1.0
        elif kind == "reversed":
            heatmap[:] = 1.0
            heatmap[top:bottom, left:right] = 0.0
        elif kind == "shifted":
            heatmap[top + 2 : bottom + 2, left + 2 : right + 2] = 1.0
        elif kind == "random":
            heatmap = rng.uniform(size=heatmap.shape).astype(np.float32)
        elif kind == "elsewhere":
            heatmap[10:14, 10:14] = 1.0
        return np.stack([heatmap, heatmap])

    def test_exact_heatmap_has_best_insertion_and_deletion(self):
        kinds = ("exact", "reversed", "shifted", "random", "elsewhere")
        scores = {
            kind: metrics.insertion_deletion_auc(
                self.model_fn, self.images, self._heatmap(kind), self.class_index, steps=16
            )
            for kind in kinds
        }
        insertion = {kind: float(np.mean(value[0])) for kind, value in scores.items()}
        deletion = {kind: float(np.mean(value[1])) for kind, value in scores.items()}
        self.assertEqual(max(insertion, key=insertion.get), "exact", insertion)
        self.assertEqual(min(deletion, key=deletion.get), "exact", deletion)
        self.assertGreater(insertion["exact"], insertion["reversed"] + 0.3)
        self.assertLess(deletion["exact"], deletion["reversed"] - 0.3)

    def test_curve_endpoints_are_blur_image_and_zeros(self):
        fractions, insertion, deletion = metrics.insertion_deletion_curves(
            self.model_fn, self.images, self._heatmap("random"), self.class_index, steps=8
        )
        self.assertAllClose(fractions, np.arange(9) / 8.0)

        def probability(images):
            return tf.nn.softmax(self.model_fn(tf.constant(images)))[:, 1].numpy()

        blurred = metrics.gaussian_blur(self.images).numpy()
        self.assertAllClose(insertion[:, 0], probability(blurred), atol=1e-6)
        self.assertAllClose(insertion[:, -1], probability(self.images), atol=1e-6)
        self.assertAllClose(deletion[:, 0], probability(self.images), atol=1e-6)
        self.assertAllClose(deletion[:, -1], probability(np.zeros_like(self.images)), atol=1e-6)

    def test_constant_model_integrates_to_its_probability(self):
        def constant(images):
            return tf.tile(tf.constant([[0.0, np.log(3.0)]], tf.float32), [tf.shape(images)[0], 1])

        insertion, deletion = metrics.insertion_deletion_auc(
            constant, self.images, self._heatmap("random"), self.class_index, steps=5
        )
        self.assertAllClose(insertion, [0.75, 0.75], atol=1e-6)
        self.assertAllClose(deletion, [0.75, 0.75], atol=1e-6)

    @parameterized.parameters(1, 7, 1000)
    def test_chunk_size_does_not_change_results(self, chunk_size):
        heatmaps = self._heatmap("shifted")
        expected = metrics.insertion_deletion_auc(
            self.model_fn, self.images, heatmaps, self.class_index, steps=6
        )
        chunked = metrics.insertion_deletion_auc(
            self.model_fn, self.images, heatmaps, self.class_index, steps=6, chunk_size=chunk_size
        )
        self.assertAllClose(expected, chunked, atol=1e-6)

    def test_area_under_curve_trapezoid(self):
        fractions = tf.constant([0.0, 0.25, 1.0])
        curves = tf.constant([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
        # [0.5 * 0.25 + 1 * 0.75, 1 * 0.25 + 0.5 * 0.75]
        self.assertAllClose(metrics.area_under_curve(fractions, curves), [0.875, 0.625])

    def test_mismatched_heatmap_size_raises(self):
        with self.assertRaisesRegex(ValueError, "heatmaps"):
            metrics.insertion_deletion_auc(
                self.model_fn, self.images, np.ones((2, 8, 8), np.float32), self.class_index
            )

    def test_bad_steps_raises(self):
        with self.assertRaisesRegex(ValueError, "steps"):
            metrics.insertion_deletion_auc(
                self.model_fn, self.images, self._heatmap("exact"), self.class_index, steps=0
            )


class ConsistencyTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.images = tf.random.stateless_uniform((4, 8, 8, 3), seed=(1, 2))

    def test_heatmap_agreement_matches_numpy(self):
        rng = np.random.default_rng(0)
        first = rng.uniform(size=(3, 5, 5)).astype(np.float32)
        second = rng.uniform(size=(3, 5, 5)).astype(np.float32)
        cosine, pearson = metrics.heatmap_agreement(first, second)
        a, b = first.reshape(3, -1), second.reshape(3, -1)
        expected_cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        expected_pearson = [np.corrcoef(a[i], b[i])[0, 1] for i in range(3)]
        self.assertAllClose(cosine, expected_cosine, atol=1e-6)
        self.assertAllClose(pearson, expected_pearson, atol=1e-5)

    def test_degenerate_heatmaps_score_zero(self):
        cosine, pearson = metrics.heatmap_agreement(np.zeros((1, 3, 3)), np.ones((1, 3, 3)))
        self.assertAllClose(cosine, [0.0])
        self.assertAllClose(pearson, [0.0])

    def test_flip_equivariant_model_scores_one(self):
        model = pointwise_model()
        cosine, pearson = metrics.consistency(model, self.images, augmentation=flip_only())
        self.assertAllClose(cosine, np.ones(4), atol=1e-5)
        self.assertAllClose(pearson, np.ones(4), atol=1e-5)

    def test_positional_model_scores_lower(self):
        model = pointwise_model(positional=True)
        cosine, pearson = metrics.consistency(model, self.images, augmentation=flip_only())
        self.assertLess(float(np.max(cosine)), 0.99)
        self.assertLess(float(np.max(pearson)), 0.95)

    def test_extractor_and_model_agree(self):
        model = cgc_tf.CGCModel(testing_models.tiny_convnet(image_size=8))
        extractor = gradcam.feature_model(model.backbone, model.target_layer)
        from_model = metrics.consistency(model, self.images, seed=5)
        from_extractor = metrics.consistency(extractor, self.images, seed=5)
        self.assertAllClose(from_model, from_extractor, atol=1e-6)
        self.assertTrue(np.all(np.abs(from_model[0].numpy()) <= 1.0 + 1e-6))

    def test_seed_and_shared_transform_make_runs_identical(self):
        model = cgc_tf.CGCModel(testing_models.tiny_convnet(image_size=8))
        first = metrics.consistency(model, self.images, seed=7)
        second = metrics.consistency(model, self.images, seed=7)
        self.assertAllEqual(first[0], second[0])
        augmentation = metrics.seeded_augmentation(None, 7)
        transform = augmentation.sample(4, 8, 8)
        shared = metrics.consistency(
            model, self.images, augmentation=augmentation, transform=transform
        )
        self.assertAllClose(first, shared, atol=1e-6)

    def test_rejects_other_objects(self):
        with self.assertRaisesRegex(ValueError, "model_or_extractor"):
            metrics.consistency(object(), self.images)


if __name__ == "__main__":
    tf.test.main()
