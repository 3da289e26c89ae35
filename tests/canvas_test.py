"""Tests of cgc_tf/data/cluttered_digits/canvas.py: the pure-NumPy renderer of one
example and its image_size check (called through the package's re-exports)."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from cgc_tf.data import cluttered_digits


class RenderExampleTest(tf.test.TestCase, parameterized.TestCase):
    """The pure-NumPy renderer behind the builder."""

    def setUp(self):
        super().setUp()
        images, _ = cluttered_digits.load_source_digits()
        self.digit = images[0]
        self.clutter = images[[1, 2, 3]]

    @parameterized.named_parameters(
        ("size16_no_clutter", 16, 0),
        ("size32_clutter", 32, 3),
        ("size48_clutter", 48, 2),
        ("size64_clutter", 64, 3),
    )
    def test_shapes_and_tight_bbox(self, image_size, clutter_count):
        image, bbox, ink_mask = cluttered_digits.render_example(
            self.digit, np.random.default_rng(7), image_size, self.clutter[:clutter_count]
        )
        self.assertEqual(image.shape, (image_size, image_size, 3))
        self.assertEqual(image.dtype, np.uint8)
        self.assertEqual(bbox.dtype, np.float32)
        self.assertEqual(ink_mask.shape, (image_size, image_size))
        rows = np.flatnonzero(ink_mask.any(axis=1))
        columns = np.flatnonzero(ink_mask.any(axis=0))
        expected = np.array(
            [rows[0], columns[0], rows[-1] + 1, columns[-1] + 1], np.float32
        ) / np.float32(image_size)
        self.assertAllClose(bbox, expected)

    def test_same_generator_state_gives_same_example(self):
        first = cluttered_digits.render_example(
            self.digit, np.random.default_rng([1, 2, 3]), 32, self.clutter
        )
        second = cluttered_digits.render_example(
            self.digit, np.random.default_rng([1, 2, 3]), 32, self.clutter
        )
        other = cluttered_digits.render_example(
            self.digit, np.random.default_rng([1, 2, 4]), 32, self.clutter
        )
        for first_array, second_array in zip(first, second):
            self.assertAllEqual(first_array, second_array)
        self.assertNotAllEqual(first[0], other[0])

    def test_without_clutter_only_the_digit_leaves_the_background(self):
        image, bbox, ink_mask = cluttered_digits.render_example(
            self.digit, np.random.default_rng(3), 48, np.zeros((0, 8, 8))
        )
        colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
        background = colours[np.argmax(counts)]
        painted = np.any(image != background, axis=-1)
        rows = np.flatnonzero(painted.any(axis=1))
        columns = np.flatnonzero(painted.any(axis=0))
        painted_box = np.array([rows[0], columns[0], rows[-1] + 1, columns[-1] + 1])
        ink_box = np.rint(bbox * 48).astype(int)
        # Everything painted is the digit: its ink box plus the soft anti-aliased
        # rim, which is at most one upscaled source pixel (<= 0.7 * 48 / 8 px) wide.
        rim = int(np.ceil(0.7 * 48 / 8))
        self.assertAllInRange(ink_box[:2] - painted_box[:2], 0, rim)
        self.assertAllInRange(painted_box[2:] - ink_box[2:], 0, rim)
        self.assertTrue(np.all(painted[ink_mask]))

    def test_clutter_never_covers_the_digit(self):
        no_clutter = np.zeros((0, 8, 8))
        ink_pixels_under_clutter = 0
        for seed in range(30):
            # Same generator state: the colours, scale and position of the digit
            # are drawn before any clutter, so both renders share the digit.
            clean = cluttered_digits.render_example(
                self.digit, np.random.default_rng(seed), 32, no_clutter
            )
            cluttered = cluttered_digits.render_example(
                self.digit, np.random.default_rng(seed), 32, self.clutter
            )
            self.assertAllEqual(clean[1], cluttered[1])
            self.assertAllEqual(clean[2], cluttered[2])
            self.assertTrue(np.any(clean[0] != cluttered[0]), msg="no clutter drawn")
            ink = clean[2]
            ink_pixels_under_clutter += np.sum(np.any(clean[0] != cluttered[0], axis=-1) & ink)
            # The digit is painted last with opacity >= INK_THRESHOLD on its ink,
            # so clutter underneath can shift those pixels by at most half the range.
            difference = np.abs(clean[0].astype(int) - cluttered[0].astype(int))[ink]
            self.assertLessEqual(difference.max(), 128)
        # Makes sure the bound above was exercised by real overlaps.
        self.assertGreater(ink_pixels_under_clutter, 0)

    @parameterized.named_parameters(
        ("too_small", 15),
        ("zero", 0),
        ("negative", -48),
        ("float", 48.0),
        ("string", "48"),
        ("bool", True),
        ("none", None),
    )
    def test_rejects_bad_image_size(self, image_size):
        with self.assertRaisesRegex(ValueError, r"image_size must be an integer >= 16, got"):
            cluttered_digits.render_example(self.digit, np.random.default_rng(0), image_size, [])
        with self.assertRaisesRegex(ValueError, "image_size"):
            cluttered_digits.load("train", data_dir="/nonexistent", image_size=image_size)
        with self.assertRaisesRegex(ValueError, "image_size"):
            cluttered_digits.builder(data_dir="/nonexistent", image_size=image_size)
        with self.assertRaisesRegex(ValueError, "image_size"):
            cluttered_digits.ClutteredDigitsConfig(name="bad", image_size=image_size)

    def test_smallest_size_is_accepted(self):
        image, _, _ = cluttered_digits.render_example(
            self.digit, np.random.default_rng(0), 16, self.clutter
        )
        self.assertEqual(image.shape, (16, 16, 3))


if __name__ == "__main__":
    tf.test.main()
