"""Tests of cgc_tf/data/views.py: the deterministic and classification views of METHOD.md."""

import math

import numpy as np
import tensorflow as tf

from cgc_tf.data import views


class ViewsTest(tf.test.TestCase):
    def test_deterministic_view_is_resize_then_centre_crop(self):
        rng = np.random.default_rng(0)
        for height, width, size in ((375, 500, 64), (40, 30, 32), (3, 5, 16), (20, 20, 20)):
            image = tf.constant(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            short = views.resize_side(size)
            resized_height = max(size, round(height * short / min(height, width)))
            resized_width = max(size, round(width * short / min(height, width)))
            resized = tf.image.resize(image, [resized_height, resized_width], antialias=True)
            top, left = (resized_height - size) // 2, (resized_width - size) // 2
            expected = resized[top : top + size, left : left + size] / 255.0
            self.assertAllClose(views.deterministic_view(image, size), expected, atol=1e-5)

    def test_classification_view_is_seeded_and_flips_about_half(self):
        gradient = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (48, 1, 3))
        image = tf.constant(gradient)
        first = views.classification_view(image, 16, tf.constant([5, 6]))
        self.assertAllEqual(first, views.classification_view(image, 16, tf.constant([5, 6])))
        flips = []
        for seed in range(100):
            row = views.classification_view(image, 16, tf.constant([seed, 0]))[8, :, 0].numpy()
            self.assertTrue(np.all(np.diff(row) >= 0) or np.all(np.diff(row) <= 0))
            flips.append(row[0] > row[-1])
        self.assertBetween(np.mean(flips), 0.35, 0.65)

    def test_resize_side_and_min_decoded_side(self):
        # The ImageNet convention: 224 -> 256.
        self.assertEqual(views.resize_side(224), 256)
        self.assertEqual(views.resize_side(32), 37)  # round(32 * 256 / 224 = 36.57)
        self.assertEqual(views.min_decoded_side(224, classification_view=False), 256)
        # The smallest crop (area 0.08) must still hold 224 pixels: ceil(224 / sqrt(0.08)).
        self.assertEqual(views.min_decoded_side(224, classification_view=True), 792)
        self.assertEqual(
            views.min_decoded_side(32, classification_view=True), math.ceil(32 / math.sqrt(0.08))
        )

    def test_boxes_follow_resize_and_centre_crop(self):
        # 40 x 80 image, S = 32: short side 40 -> 37 (scale 37/40), so 37 x 74,
        # crop offset top (37 - 32) // 2 = 2, left (74 - 32) // 2 = 21.
        boxes = tf.constant([[0.1, 0.25, 0.9, 0.75], [-1.0, -1.0, -1.0, -1.0]])
        mapped = views.deterministic_view_boxes(boxes, (40, 80, 3), 32)
        expected = [
            [(0.1 * 37 - 2) / 32, 0.0, (0.9 * 37 - 2) / 32, 1.0],  # x clipped on both sides
            [-1.0, -1.0, -1.0, -1.0],  # padding stays padding
        ]
        self.assertAllClose(mapped, expected, atol=1e-6)

    def test_boxes_and_pixels_agree(self):
        # A white box drawn in the image lands where its mapped box says.
        image = np.zeros((60, 90, 3), np.uint8)
        image[12:48, 30:60] = 255
        box = [[12 / 60, 30 / 90, 48 / 60, 60 / 90]]
        view = views.deterministic_view(tf.constant(image), 32).numpy()[..., 0]
        ymin, xmin, ymax, xmax = (views.deterministic_view_boxes(box, (60, 90), 32)[0] * 32).numpy()
        inside = view[int(math.ceil(ymin)) + 1 : int(ymax) - 1, int(math.ceil(xmin)) + 1 : int(xmax) - 1]
        self.assertAllClose(inside, np.ones_like(inside), atol=1e-6)
        self.assertAllClose(view[:, : int(xmin) - 1], np.zeros_like(view[:, : int(xmin) - 1]))

    def test_classification_view_of_a_constant_image_is_that_constant(self):
        image = tf.fill([50, 70, 3], tf.constant(51, tf.uint8))
        for seed in range(5):
            view = views.classification_view(image, 16, tf.constant([seed, 1]))
            self.assertEqual(view.shape, (16, 16, 3))
            self.assertEqual(view.dtype, tf.float32)
            self.assertAllClose(view, tf.fill([16, 16, 3], 0.2), atol=1e-6)


if __name__ == "__main__":
    tf.test.main()
