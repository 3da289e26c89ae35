"""Tests of cgc_tf/custom_loop.py on one device: completed epochs, the barrier, train vs fit.

The multi-worker behaviour (preemption, workers' checkpoints) is in multi_worker_test.py.
"""

import os
import signal

import keras
import numpy as np
import tensorflow as tf

from cgc_tf import custom_loop
from tests import testing_devices


def _linear_model():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1, kernel_initializer="ones")(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


_X = np.arange(24, dtype=np.float32).reshape(8, 3) / 24.0
_Y = np.arange(8, dtype=np.float32).reshape(8, 1) / 8.0


def _dataset_fn(input_context, epoch):
    del epoch  # the same 4 batches of 2 every epoch
    batch_size = input_context.get_per_replica_batch_size(2)
    return tf.data.Dataset.from_tensor_slices((_X, _Y)).batch(batch_size).repeat()


class CompletedEpochsTest(tf.test.TestCase):
    def test_no_checkpoint_is_zero_epochs(self):
        root = self.get_temp_dir()
        self.assertEqual(custom_loop.completed_epochs(os.path.join(root, "missing")), 0)
        os.makedirs(os.path.join(root, "empty"))
        self.assertEqual(custom_loop.completed_epochs(os.path.join(root, "empty")), 0)

    def test_reads_the_epoch_of_the_latest_checkpoint(self):
        directory = os.path.join(self.get_temp_dir(), "checkpoints")
        epoch = tf.Variable(0, dtype=tf.int64)
        checkpoint = tf.train.Checkpoint(epoch=epoch, step_in_epoch=tf.Variable(0, dtype=tf.int64))
        manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=2)
        for value in (1, 3):
            epoch.assign(value)
            manager.save()
        self.assertEqual(custom_loop.completed_epochs(directory), 3)


class TrainTest(tf.test.TestCase):
    def test_train_equals_fit_and_resumes_where_it_stopped(self):
        strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
        directory = os.path.join(self.get_temp_dir(), "checkpoints")
        with strategy.scope():
            model = _linear_model()
        custom_loop.train(model, strategy, _dataset_fn, 1, 4, directory, verbose=0)
        self.assertEqual(custom_loop.completed_epochs(directory), 1)
        # The oracle: Keras' own fit on the same batches, in the same order.
        reference = _linear_model()
        reference.fit(_X, _Y, batch_size=2, epochs=1, shuffle=False, verbose=0)
        for actual, expected in zip(model.get_weights(), reference.get_weights()):
            self.assertAllClose(actual, expected, atol=1e-6)
        # A fresh model resumes from the checkpoint and trains only epoch 2.
        with strategy.scope():
            resumed = _linear_model()
        history = custom_loop.train(resumed, strategy, _dataset_fn, 2, 4, directory, verbose=0)
        self.assertEqual(custom_loop.completed_epochs(directory), 2)
        self.assertLen(history.history["loss"], 1)
        reference.fit(_X, _Y, batch_size=2, epochs=1, shuffle=False, verbose=0)
        for actual, expected in zip(resumed.get_weights(), reference.get_weights()):
            self.assertAllClose(actual, expected, atol=1e-6)
        self.assertEqual(int(resumed.optimizer.iterations), 8)


class SigtermFlagTest(tf.test.TestCase):
    def test_records_sigterm_and_restores_the_previous_handler(self):
        received = []
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
        try:
            flag = custom_loop._SigtermFlag()
            flag.install()
            self.assertEqual(float(flag.value()), 0.0)
            os.kill(os.getpid(), signal.SIGTERM)
            self.assertEqual(float(flag.value()), 1.0)
            self.assertEqual(received, [])
            flag.uninstall()
            os.kill(os.getpid(), signal.SIGTERM)
            self.assertEqual(received, [signal.SIGTERM])
        finally:
            signal.signal(signal.SIGTERM, previous)


class BarrierTest(testing_devices.TwoReplicaTestCase):
    def test_counts_the_replicas(self):
        self.assertEqual(custom_loop.barrier(tf.distribute.get_strategy()), 1)
        self.assertEqual(custom_loop.barrier(self.strategy), 2)


if __name__ == "__main__":
    tf.test.main()
