"""Tests of cgc_tf.callbacks on a tiny Keras model (no CGC training)."""

import csv
import glob
import json
import os
import signal
from unittest import mock

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.util import event_pb2

from cgc_tf import callbacks
from cgc_tf import model_dir
from tests import testing_models


def _tiny_regression():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss="mse", jit_compile=False)
    x = np.ones((8, 3), np.float32)
    y = np.zeros((8, 1), np.float32)
    return model, x, y


def _events(directory):
    values = []
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            values.extend((event.step, value) for value in event.summary.value)
    return values


class _SendSigterm(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.epoch, self.batch, self._current = epoch, batch, 0

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self._current, batch) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGTERM)


class _Interrupted(BaseException):
    """Stands for the process dying inside a checkpoint save."""


def _interrupt_commit(call, after):
    """Patches model_dir._commit (the rename of every atomic write) to raise
    _Interrupted at its `call`-th call (1-based), before or `after` the rename."""
    real_commit = model_dir._commit
    calls = []

    def commit(temporary_path, path):
        calls.append(path)
        if len(calls) == call and not after:
            raise _Interrupted(path)
        real_commit(temporary_path, path)
        if len(calls) == call:
            raise _Interrupted(path)

    return mock.patch.object(model_dir, "_commit", commit)


class CallbacksTest(tf.test.TestCase, parameterized.TestCase):

    def test_stop_on_non_finite_loss_message(self):
        stop = callbacks.StopOnNonFiniteLoss("last good: /x", suggestions=["lower the rate"])
        stop.on_epoch_begin(2)
        stop.on_train_batch_end(4, {"loss": 1.0, "ce_loss": 0.5, "cgc_loss": 1.0})
        with self.assertRaises(callbacks.NonFiniteLossError) as raised:
            stop.on_train_batch_end(
                5, {"loss": tf.constant(np.inf), "ce_loss": 0.5, "cgc_loss": np.nan}
            )
        message = str(raised.exception)
        for fragment in ("epoch 3, step 6", "loss=inf", "ce_loss=0.5", "cgc_loss=nan",
                         "last good: /x", "- lower the rate"):
            self.assertIn(fragment, message)

    def test_truncate_csv_log_keeps_completed_epochs(self):
        path = os.path.join(self.get_temp_dir(), "log.csv")
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([["epoch", "loss"], ["0", "1.0"], ["1", "0.9"], ["2", "0.8"]])
        callbacks.truncate_csv_log(path, completed_epochs=2)
        with open(path, newline="") as f:
            self.assertEqual(list(csv.reader(f)), [["epoch", "loss"], ["0", "1.0"], ["1", "0.9"]])
        callbacks.truncate_csv_log(os.path.join(self.get_temp_dir(), "missing.csv"), 0)

    def test_resumable_csv_logger_keeps_existing_columns(self):
        path = os.path.join(self.get_temp_dir(), "log.csv")
        first = callbacks.ResumableCSVLogger(path)
        first.on_train_begin()
        # No validation in the first epoch: val_ columns still exist, except for
        # train-only keys such as the learning rate.
        first.on_epoch_end(0, {"loss": 1.0, "learning_rate": 0.1})
        first.on_epoch_end(1, {"loss": 0.5, "learning_rate": 0.1, "val_loss": 0.7})
        first.on_train_end()
        resumed = callbacks.ResumableCSVLogger(path, append=True)
        resumed.on_train_begin()
        resumed.on_epoch_end(2, {"loss": 0.25, "learning_rate": 0.01, "val_loss": 0.3})
        resumed.on_train_end()
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        self.assertEqual(rows[0], ["epoch", "learning_rate", "loss", "val_loss"])
        self.assertEqual(rows[1:], [["0", "0.1", "1.0", "NA"], ["1", "0.1", "0.5", "0.7"],
                                    ["2", "0.01", "0.25", "0.3"]])

    def test_backup_restores_and_keeps_finished_state(self):
        backup_dir = os.path.join(self.get_temp_dir(), "backup")
        model, x, y = _tiny_regression()
        model.fit(x, y, epochs=2, verbose=0,
                  callbacks=[callbacks.PreemptibleBackupAndRestore(backup_dir)])
        self.assertEqual(callbacks.PreemptibleBackupAndRestore.completed_epochs(backup_dir), 2)
        again, x, y = _tiny_regression()
        history = again.fit(x, y, epochs=3, verbose=0,
                            callbacks=[callbacks.PreemptibleBackupAndRestore(backup_dir)])
        self.assertEqual(history.epoch, [2])
        self.assertEqual(int(again.optimizer.iterations), 3)
        self.assertCountEqual(
            os.listdir(backup_dir),
            ["epoch-0003.weights.h5", "latest.weights.h5", "training_metadata.json"],
        )
        self.assertTrue(
            os.path.samefile(os.path.join(backup_dir, "epoch-0003.weights.h5"),
                             os.path.join(backup_dir, "latest.weights.h5"))
        )

    # A save commits the weights file, then the metadata (the commit point), then
    # latest.weights.h5; each of the 3 renames of the 2nd save (calls 4-6) is
    # interrupted before and after it happens.
    @parameterized.parameters(
        (4, False, 1), (4, True, 1), (5, False, 1), (5, True, 2), (6, False, 2), (6, True, 2)
    )
    def test_interrupted_save_leaves_a_consistent_checkpoint(self, call, after, completed):
        backup_dir = os.path.join(self.get_temp_dir(), f"interrupted_{call}_{after}")
        model, x, y = _tiny_regression()
        with _interrupt_commit(call, after), self.assertRaises(_Interrupted):
            model.fit(x, y, epochs=3, verbose=0,
                      callbacks=[callbacks.PreemptibleBackupAndRestore(backup_dir)])
        self.assertEqual(
            callbacks.PreemptibleBackupAndRestore.completed_epochs(backup_dir), completed
        )
        resumed, x, y = _tiny_regression()
        history = resumed.fit(x, y, epochs=3, verbose=0,
                              callbacks=[callbacks.PreemptibleBackupAndRestore(backup_dir)])
        self.assertEqual(history.epoch, list(range(completed, 3)))
        # One step per epoch: the restored optimizer state was that of the stated epoch.
        self.assertEqual(int(resumed.optimizer.iterations), 3)
        self.assertCountEqual(
            os.listdir(backup_dir),
            ["epoch-0003.weights.h5", "latest.weights.h5", "training_metadata.json"],
        )

    def test_restores_metadata_without_weights_name(self):
        backup_dir = os.path.join(self.get_temp_dir(), "earlier_format")
        model, x, y = _tiny_regression()
        model.fit(x, y, epochs=1, verbose=0)
        os.makedirs(backup_dir)
        model.save_weights(os.path.join(backup_dir, "latest.weights.h5"))
        with open(os.path.join(backup_dir, "training_metadata.json"), "w") as f:
            json.dump({"epoch": 1, "batch": 0}, f)
        resumed, x, y = _tiny_regression()
        history = resumed.fit(x, y, epochs=2, verbose=0,
                              callbacks=[callbacks.PreemptibleBackupAndRestore(backup_dir)])
        self.assertEqual(history.epoch, [1])
        self.assertEqual(int(resumed.optimizer.iterations), 2)

    def test_metadata_naming_a_missing_file_is_a_readable_error(self):
        backup_dir = os.path.join(self.get_temp_dir(), "missing")
        os.makedirs(backup_dir)
        with open(os.path.join(backup_dir, "training_metadata.json"), "w") as f:
            json.dump({"epoch": 1, "batch": 0, "weights": "epoch-0001.weights.h5"}, f)
        model, x, y = _tiny_regression()
        with self.assertRaisesRegex(FileNotFoundError, "epoch-0001.weights.h5.*does not exist"):
            model.fit(x, y, epochs=2, verbose=0,
                      callbacks=[callbacks.PreemptibleBackupAndRestore(backup_dir)])

    def test_atomic_model_checkpoint_keeps_previous_file_when_interrupted(self):
        path = os.path.join(self.get_temp_dir(), "model", "last_epoch.keras")
        with self.assertRaisesRegex(ValueError, r"filepath='last_epoch.h5' must end in '.keras'"):
            callbacks.AtomicModelCheckpoint("last_epoch.h5")
        model, x, y = _tiny_regression()
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callbacks.AtomicModelCheckpoint(path)])
        first_epoch = model.get_weights()
        self.assertAllClose(keras.models.load_model(path).get_weights(), first_epoch)
        with _interrupt_commit(1, after=False), self.assertRaises(_Interrupted):
            model.fit(x, y, epochs=1, verbose=0, callbacks=[callbacks.AtomicModelCheckpoint(path)])
        self.assertNotAllClose(model.get_weights()[0], first_epoch[0])
        self.assertAllClose(keras.models.load_model(path).get_weights(), first_epoch)
        self.assertIn("last_epoch.partial.keras", os.listdir(os.path.dirname(path)))
        # The next save replaces the file and removes the interrupted save's leftover.
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callbacks.AtomicModelCheckpoint(path)])
        self.assertEqual(os.listdir(os.path.dirname(path)), ["last_epoch.keras"])
        self.assertAllClose(keras.models.load_model(path).get_weights(), model.get_weights())

    def test_sigterm_saves_then_raises_and_restores_handler(self):
        backup_dir = os.path.join(self.get_temp_dir(), "sigterm")
        previous = signal.getsignal(signal.SIGTERM)
        model, x, y = _tiny_regression()
        backup = callbacks.PreemptibleBackupAndRestore(backup_dir)
        with self.assertRaisesRegex(callbacks.TrainingPreempted, "epoch 2, step 3"):
            model.fit(x, y, batch_size=2, epochs=5, verbose=0,
                      callbacks=[backup, _SendSigterm(epoch=1, batch=2)])
        # Restored by the callback itself, although fit() skips on_train_end.
        self.assertEqual(signal.getsignal(signal.SIGTERM), previous)
        with open(os.path.join(backup_dir, "training_metadata.json")) as f:
            # The unfinished epoch 1 (0-based) restarts on resume.
            self.assertEqual(
                json.load(f),
                {"epoch": 1, "batch": 2, "weights": "epoch-0001-step-000003.weights.h5"},
            )
        saved = model.get_weights()
        resumed, x, y = _tiny_regression()
        history = resumed.fit(x, y, batch_size=2, epochs=2, verbose=0,
                              callbacks=[callbacks.PreemptibleBackupAndRestore(backup_dir)])
        self.assertEqual(history.epoch, [1])
        self.assertNotAllClose(resumed.get_weights()[0], saved[0])

    def test_summaries_are_tensorboard_events(self):
        log_dir = self.get_temp_dir()
        summaries = callbacks.EpochSummaries(log_dir)
        summaries.on_epoch_end(0, {"loss": 2.0, "val_loss": 3.0})
        summaries.on_train_end()
        (step, value), = _events(os.path.join(log_dir, "train"))
        self.assertEqual((step, value.tag, value.metadata.plugin_data.plugin_name),
                         (1, "epoch_loss", "scalars"))
        self.assertAllClose(tf.make_ndarray(value.tensor), 2.0)
        (_, value), = _events(os.path.join(log_dir, "validation"))
        self.assertAllClose(tf.make_ndarray(value.tensor), 3.0)

    def test_heatmap_summary_writes_side_by_side_pngs(self):
        log_dir = self.get_temp_dir()
        backbone = testing_models.tiny_convnet(image_size=16, num_classes=3)
        from cgc_tf.model import CGCModel  # noqa: PLC0415

        model = CGCModel(backbone, target_layer="features")
        images = np.random.default_rng(0).random((2, 16, 16, 3), np.float32)
        summary = callbacks.HeatmapSummary(images, log_dir, every=2)
        summary.set_model(model)
        summary.on_epoch_end(0)  # epoch 1: not a multiple of 2
        self.assertEmpty(_events(log_dir))
        summary.on_epoch_end(1)
        summary.on_train_end()
        (step, value), = _events(log_dir)
        self.assertEqual((step, value.tag, value.metadata.plugin_data.plugin_name),
                         (2, "heatmaps", "images"))
        tensor = tf.make_ndarray(value.tensor)
        self.assertEqual(list(tensor[:2]), [b"32", b"16"])  # width, height
        decoded = tf.io.decode_png(tensor[2]).numpy()
        self.assertEqual(decoded.shape, (16, 32, 3))
        self.assertAllEqual(decoded[:, :16], np.round(images[0] * 255).astype(np.uint8))


if __name__ == "__main__":
    tf.test.main()
