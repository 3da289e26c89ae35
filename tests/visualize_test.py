"""Tests for cgc_tf.visualize: overlay arithmetic and readable PNG grids."""

import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from matplotlib import colormaps
from PIL import Image

from cgc_tf import visualize


def _image(size=8, seed=0):
    return np.random.default_rng(seed).uniform(size=(size, size, 3)).astype(np.float32)


class OverlayTest(tf.test.TestCase, parameterized.TestCase):
    def test_alpha_zero_is_the_image_and_alpha_one_the_colormap(self):
        image = _image()
        heatmap = np.arange(64, dtype=np.float32).reshape(8, 8)
        self.assertAllEqual(
            visualize.overlay(image, heatmap, alpha=0.0), np.round(image * 255).astype(np.uint8)
        )
        expected = np.round(colormaps["jet"](heatmap / heatmap.max())[..., :3] * 255)
        self.assertAllClose(visualize.overlay(image, heatmap, alpha=1.0), expected, atol=1)

    def test_blend_is_a_weighted_mean(self):
        image = np.full((4, 4, 3), 0.2, np.float32)
        heatmap = np.ones((4, 4), np.float32)  # max-normalised to 1: jet's dark red
        red = np.asarray(colormaps["jet"](1.0)[:3], np.float32)
        expected = np.round((0.7 * 0.2 + 0.3 * red) * 255)
        result = visualize.overlay(image, heatmap, alpha=0.3)
        self.assertEqual(result.dtype, np.uint8)
        self.assertAllClose(result[0, 0], expected, atol=1)

    def test_heatmap_is_resized_to_the_image_and_uint8_grey_images_work(self):
        image = np.full((16, 12), 100, np.uint8)
        heatmap = np.zeros((4, 3), np.float32)
        heatmap[0, 0] = 5.0
        result = visualize.overlay(image, heatmap)
        self.assertEqual(result.shape, (16, 12, 3))
        self.assertGreater(int(result[0, 0, 0]), int(result[-1, -1, 0]))  # red corner

    def test_zero_heatmap_gives_the_lowest_colour(self):
        result = visualize.colorize(np.zeros((3, 3)))
        lowest = np.round(np.asarray(colormaps["jet"](0.0)[:3]) * 255)
        self.assertAllClose(result[1, 1], lowest, atol=1)

    @parameterized.parameters(
        dict(kwargs={"alpha": 1.5}, pattern="alpha"),
        dict(kwargs={"colormap": "no_such_map"}, pattern="colormap"),
    )
    def test_bad_arguments_raise(self, kwargs, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            visualize.overlay(_image(), np.ones((8, 8)), **kwargs)

    def test_batched_overlays_for_summaries(self):
        images = tf.random.uniform((3, 8, 8, 3), seed=1)
        heatmaps = tf.random.uniform((3, 4, 4), seed=2)
        result = visualize.overlays(images, heatmaps)
        self.assertEqual(result.shape, (3, 8, 8, 3))
        self.assertEqual(result.dtype, np.uint8)
        self.assertAllEqual(result[1], visualize.overlay(images[1].numpy(), heatmaps[1].numpy()))
        with self.assertRaisesRegex(ValueError, "same N"):
            visualize.overlays(images, heatmaps[:2])


class GridTest(tf.test.TestCase):
    def _directory(self):
        # tempfile rather than create_tempdir, which needs absl flags parsed.
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        return directory

    def test_save_grid_writes_png_whose_size_follows_the_grid(self):
        directory = self._directory()
        rows = [[_image(seed=i + j) for j in range(3)] for i in range(2)]
        small = visualize.save_grid(os.path.join(directory, "a", "grid.png"), rows, ["a", "b", "c"])
        wide = visualize.save_grid(
            os.path.join(directory, "wide.png"), [row + row for row in rows], list("abcdef")
        )
        with Image.open(small) as first, Image.open(wide) as second:
            self.assertEqual(first.format, "PNG")
            self.assertGreater(second.width, 1.7 * first.width)
            self.assertEqual(first.height, second.height)

    def test_save_grid_checks_title_counts(self):
        with self.assertRaisesRegex(ValueError, "column_titles"):
            visualize.save_grid(
                os.path.join(self._directory(), "x.png"), [[_image()]], ["a", "b"]
            )
        with self.assertRaisesRegex(ValueError, "rows"):
            visualize.save_grid("unused.png", [[_image()], []])

    def test_consistency_grid_with_two_models(self):
        rng = np.random.default_rng(0)
        images = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
        explanation = {
            key: rng.uniform(size=(2, 16, 16)).astype(np.float32)
            for key in ("heatmap", "transformed_heatmap", "warped_heatmap")
        }
        path = os.path.join(self._directory(), "grid.png")
        one = visualize.consistency_grid(path, images, images[:, :, ::-1], {"a": explanation})
        with Image.open(one) as single:
            single_width = single.width
        both = dict(explanation, captions=["cos 0.50", "cos 0.90"])
        visualize.consistency_grid(
            path, images, images, {"a": explanation, "b": both}, row_titles=["1", "2"]
        )
        with Image.open(path) as grid:
            # 5 columns for one model, 8 for two.
            self.assertAllClose(grid.width / single_width, 8 / 5, atol=0.05)
        with self.assertRaisesRegex(ValueError, "warped_heatmap"):
            visualize.consistency_grid(path, images, images, {"a": {"heatmap": images[..., 0]}})


if __name__ == "__main__":
    tf.test.main()
