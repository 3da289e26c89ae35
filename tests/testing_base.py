"""Shared test base: the serialization and .keras save/load round trips every Keras object needs.

Like keras-hub's TestCase: `run_serialization_test` checks get_config/from_config
and Keras' registered (de)serialization; `run_model_saving_test` saves a model to
.keras, loads it back and compares the outputs on the same inputs. Beside it,
small file fixtures that several test modules write: a temporary directory and
an annotated (Pascal-VOC) image folder.
"""

import copy
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from PIL import Image


class TestCase(tf.test.TestCase, parameterized.TestCase):
    """tf.test.TestCase with the round trips of keras-hub's test base."""

    def run_serialization_test(self, instance):
        """get_config -> from_config and serialize -> deserialize give equal configs.

        Args:
          instance: a Keras object with get_config (layer, model, schedule, ...).

        Returns:
          The object rebuilt by `from_config`, for further checks.
        """
        config = instance.get_config()
        # A copy: deserializing nested Keras objects may consume the dict it is given.
        revived = type(instance).from_config(copy.deepcopy(config))
        self.assertIsInstance(revived, type(instance))
        self.assertEqual(revived.get_config(), config)
        # Through the registered name, as `keras.models.load_model` finds it.
        deserialized = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(instance)
        )
        self.assertIsInstance(deserialized, type(instance))
        self.assertEqual(deserialized.get_config(), config)
        return revived

    def run_model_saving_test(self, model, inputs, call=None, atol=1e-6):
        """Saves `model` to .keras, loads it, and checks that the outputs agree.

        Args:
          model: a built keras.Model.
          inputs: what `call` takes as its second argument.
          call: function (model, inputs) -> tensor or nest of tensors; default
            `model(inputs, training=False)`.
          atol: absolute tolerance of the comparison.

        Returns:
          The loaded model.
        """
        call = call or (lambda m, x: m(x, training=False))
        path = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        self.assertIsInstance(loaded, type(model))
        expected, actual = call(model, inputs), call(loaded, inputs)
        tf.nest.assert_same_structure(expected, actual)
        for before, after in zip(tf.nest.flatten(expected), tf.nest.flatten(actual)):
            self.assertAllClose(before, after, atol=atol)
        return loaded


def temporary_directory(test):
    """A new directory removed when `test` (a unittest.TestCase) finishes."""
    # tf.test's create_tempdir needs parsed absl flags, which pytest does not do.
    directory = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return directory


def write_voc_image(root, name, width, height, objects=None, xml=None, seed=0):
    """root/val/<name>.JPEG and root/annotation/<name>.xml (`cgc_tf.data.annotated`'s layout).

    Args:
      root: str, the annotated folder.
      name: str, the file stem.
      width, height: int, the image size in pixels (random seeded pixels).
      objects: sequence of (class name, xmin, ymin, xmax, ymax), 1-based inclusive
        pixel boxes, written as a Pascal-VOC XML; used when `xml` is None.
      xml: str, the XML text to write as is, or False to write no XML.
      seed: int, seeds the pixels.
    """
    os.makedirs(os.path.join(root, "val"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotation"), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(root, "val", f"{name}.JPEG"))
    if xml is None:
        boxes = "".join(
            f"<object><name>{n}</name><pose>Unspecified</pose><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for n, x0, y0, x1, y1 in objects
        )
        xml = (f"<annotation><folder>val</folder><filename>{name}</filename><size>"
               f"<width>{width}</width><height>{height}</height><depth>3</depth></size>"
               f"{boxes}</annotation>")
    if xml is not False:
        with open(os.path.join(root, "annotation", f"{name}.xml"), "w") as file:
            file.write(xml)
