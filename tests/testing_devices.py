"""Logical CPU devices for the tests of replicated steps, and a test case on two of them."""

import keras
import tensorflow as tf
from absl.testing import parameterized
# Private, as in Keras's own distribute tests: logical devices can only be
# reconfigured after resetting the eager context.
from tensorflow.python.eager import context


def configure_logical_cpus(count):
    """Splits the physical CPU into `count` logical devices (all TF state is reset).

    Args:
      count: int >= 1; 1 restores the default single CPU device.
    """
    keras.backend.clear_session()
    context._reset_context()  # pylint: disable=protected-access
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    )
    # The global tf.random.Generator (keras-cv layers draw from it) would keep a
    # variable of the reset context, failing every later test that uses it (e.g.
    # keras-cv layers under XLA, depending on the test order).
    tf.random.set_global_generator(tf.random.Generator.from_non_deterministic_state())


class TwoReplicaTestCase(tf.test.TestCase, parameterized.TestCase):
    """Runs its tests with two logical CPUs and restores one CPU afterwards.

    `cls.strategy` is a MirroredStrategy over the two.
    """

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        configure_logical_cpus(2)
        cls.strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    @classmethod
    def tearDownClass(cls):
        configure_logical_cpus(1)
        super().tearDownClass()
