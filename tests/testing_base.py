"""Shared test base: the serialization and .keras save/load round trips every Keras object needs.

Like keras-hub's TestCase: `run_serialization_test` checks get_config/from_config
and Keras' registered (de)serialization; `run_model_saving_test` saves a model to
.keras, loads it back and compares the outputs on the same inputs.
"""

import copy
import os
import tempfile

import keras
import tensorflow as tf
from absl.testing import parameterized


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
