"""Tests of cgc_tf/model_loading.py: loading a .keras file, a model_dir and a cgc-export folder."""

import json
import os
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow as tf

import cgc_tf
from cgc_tf import evaluation
from cgc_tf import model_dir
from cgc_tf import model_loading
from tests import testing_models

IMAGE_SIZE = 16


def tiny_model(seed=0):
    return cgc_tf.CGCModel(testing_models.tiny_convnet(image_size=IMAGE_SIZE, seed=seed))


def tiny_dataset(num_images=6, batch_size=4):
    """Batches {"image", "label", "bbox"} of random images, two boxes per image."""
    rng = np.random.default_rng(0)
    boxes = np.full((num_images, 2, 4), -1.0, np.float32)
    boxes[:, 0] = [0.1, 0.2, 0.6, 0.9]
    boxes[::2, 1] = [0.5, 0.5, 1.0, 1.0]
    elements = {
        "image": rng.uniform(size=(num_images, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32),
        "label": (np.arange(num_images) % 3).astype(np.int32),
        "bbox": boxes,
    }
    return tf.data.Dataset.from_tensor_slices(elements).batch(batch_size)


class LoadModelTest(tf.test.TestCase):
    def _directory(self):
        # tempfile rather than create_tempdir, which needs absl flags parsed.
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        return directory

    def test_load_model_from_file_and_model_dir(self):
        directory = self._directory()
        model = tiny_model()
        model.save(os.path.join(directory, "model.keras"))
        with open(os.path.join(directory, "config.json"), "w") as file:
            json.dump({"dataset": "cluttered_digits", "image_size": IMAGE_SIZE}, file)
        images = next(iter(tiny_dataset()))["image"]
        for path in (directory, os.path.join(directory, "model.keras")):
            loaded = model_loading.load_model(path)
            self.assertIsInstance(loaded, cgc_tf.CGCModel)
            self.assertAllClose(
                loaded.explain(images)["heatmap"], model.explain(images)["heatmap"], atol=1e-6
            )
            self.assertEqual(model_dir.read_config(path)["image_size"], IMAGE_SIZE)
        with self.assertRaisesRegex(ValueError, "model.keras"):
            model_loading.load_model(self._directory())
        with self.assertRaisesRegex(ValueError, "neither"):
            model_loading.load_model(os.path.join(directory, "missing.h5"))
        self.assertEqual(model_dir.read_config(self._directory()), {})

    def test_check_batch_names_the_model_and_what_to_change(self):
        explainers = {"m": model_loading.as_explainer(tiny_model())}
        images = tf.zeros([2, IMAGE_SIZE, IMAGE_SIZE, 3])
        model_loading.check_batch(images, tf.constant([0, 2]), explainers)
        with self.assertRaisesRegex(ValueError, r"labels span \[0, 3\] but model 'm' has 3"):
            model_loading.check_batch(images, tf.constant([0, 3]), explainers)
        with self.assertRaisesRegex(ValueError, "model 'm' takes 16x16 images .* 8x8"):
            model_loading.check_batch(tf.zeros([2, 8, 8, 3]), tf.constant([0, 1]), explainers)

    @pytest.mark.slow
    def test_saved_model_from_cgc_export_gives_the_same_metrics(self):
        from cgc_tf import export

        directory = self._directory()
        model = tiny_model()
        export.export_model(model, directory, version=3, formats=("saved_model",))
        loaded = model_loading.load_model(directory)  # picks the highest version
        self.assertIsInstance(loaded, model_loading.SavedModelExplainer)
        self.assertEqual(loaded.image_size, (IMAGE_SIZE, IMAGE_SIZE))
        exported = evaluation.evaluate_model(loaded, tiny_dataset(), auc_steps=4, progress=False)
        reference = evaluation.evaluate_model(model, tiny_dataset(), auc_steps=4, progress=False)
        for metric in evaluation.PER_IMAGE_METRICS:
            self.assertAllClose(exported[metric], reference[metric], atol=1e-4, msg=metric)


if __name__ == "__main__":
    tf.test.main()
