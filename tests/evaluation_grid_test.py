"""Tests of cgc_tf/evaluation_grid.py: the grid's heatmaps agree with the consistency metric."""

import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from PIL import Image

import cgc_tf
from cgc_tf import evaluation_grid
from cgc_tf import metrics
from tests import testing_models

IMAGE_SIZE = 16


def tiny_model(seed=0):
    return cgc_tf.CGCModel(testing_models.tiny_convnet(image_size=IMAGE_SIZE, seed=seed))


def tiny_images(count=4):
    rng = np.random.default_rng(0)
    return rng.uniform(size=(count, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


class GridTest(tf.test.TestCase):
    def test_grid_explanations_are_consistent_with_the_metric(self):
        model = tiny_model()
        images = tf.constant(tiny_images())
        transformed, explanations = evaluation_grid.grid_explanations({"m": model}, images)
        cosine, _ = metrics.consistency(model, images, seed=0)
        self.assertAllClose(explanations["m"]["cosine"], cosine, atol=1e-5)
        self.assertEqual(transformed.shape, images.shape)
        self.assertEqual(explanations["m"]["warped_heatmap"].shape, (4, IMAGE_SIZE, IMAGE_SIZE))

    def test_save_grid_one_and_two_models(self):
        # tempfile rather than create_tempdir, which needs absl flags parsed.
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        images = tiny_images(2)
        single = evaluation_grid.save_grid(
            os.path.join(directory, "one.png"), {"m": tiny_model()}, images
        )
        double = evaluation_grid.save_grid(
            os.path.join(directory, "two.png"),
            {"a": tiny_model(), "b": tiny_model(seed=1)},
            images,
            labels=[0, 1],
        )
        with Image.open(single) as one, Image.open(double) as two:
            self.assertGreater(two.width, one.width)


if __name__ == "__main__":
    tf.test.main()
