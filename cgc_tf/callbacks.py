"""Keras callbacks of `cgc_tf.training`: failure handling, resumable logs, heatmaps.

* `StopOnNonFiniteLoss`: stops at the first non-finite loss term by raising
  `NonFiniteLossError` from `on_train_batch_end`, so no `on_epoch_end` runs and
  no checkpoint or log row is written for the broken epoch (Keras's own
  `TerminateOnNaN` sets `stop_training`, after which `fit` still calls
  `on_epoch_end` and `BackupAndRestore` would save the NaN weights).
* `PreemptibleBackupAndRestore`: `keras.callbacks.BackupAndRestore` that also
  saves on SIGTERM and then raises `TrainingPreempted`.
* `ResumableCSVLogger`: `keras.callbacks.CSVLogger` that keeps the columns of an
  existing log when appending after a resume.
* `LearningRateLogger`: adds the optimizer's current learning rate to the logs.
* `EpochSummaries`: every epoch's logs as TensorBoard scalars.
* `HeatmapSummary`: Grad-CAM overlays of fixed images as TensorBoard images.

The summaries are written with the core op `tf.summary.write` and the
TensorBoard plugin metadata, because `tf.summary.scalar`/`image` (and so
`keras.callbacks.TensorBoard`) need the `tensorboard` package, which cgc-tf
does not depend on. The event files are the ones TensorBoard reads.
"""

import csv
import json
import math
import os
import signal
import threading

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from cgc_tf import visualize

LOSS_KEYS = ("loss", "ce_loss", "cgc_loss")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; training stopped before saving it."""


class TrainingPreempted(RuntimeError):
    """SIGTERM was received; a checkpoint was saved and training stopped."""


def _as_float(value):
    return float(np.asarray(keras.ops.convert_to_numpy(value)))


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises `NonFiniteLossError` at the first batch whose loss terms are not finite.

    Put it first in the callback list. The message names the epoch (1-based),
    the step in the epoch, the value of every loss term, the last checkpoint and
    likely causes.
    """

    def __init__(self, checkpoint_description="", suggestions=()):
        """Args:
        checkpoint_description: where the last good state is, for the message.
        suggestions: likely causes to list in the message (strings).
        """
        super().__init__()
        self.checkpoint_description = checkpoint_description
        self.suggestions = tuple(suggestions)
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        values = {key: _as_float(logs[key]) for key in LOSS_KEYS if key in logs}
        if all(math.isfinite(value) for value in values.values()):
            return
        terms = ", ".join(f"{key}={value:.6g}" for key, value in values.items())
        lines = [
            f"Training stopped: non-finite loss at epoch {self._epoch + 1}, step {batch + 1} "
            f"({terms}). Nothing of this epoch was saved."
        ]
        if self.checkpoint_description:
            lines.append(self.checkpoint_description)
        if self.suggestions:
            lines.append("Likely causes:")
            lines.extend(f"  - {suggestion}" for suggestion in self.suggestions)
        raise NonFiniteLossError("\n".join(lines))


class PreemptibleBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore (save every epoch, keep the files) that also saves on SIGTERM.

    On SIGTERM the current weights and optimizer state are saved at the end of
    the running batch, marked as belonging to the unfinished epoch, and
    `TrainingPreempted` is raised. A resumed run restarts that epoch from its
    first batch with the saved (partly trained) weights: Keras restores whole
    epochs only. A SIGTERM during validation saves after the epoch completes.
    """

    def __init__(self, backup_dir):
        """Args:
        backup_dir: directory of `latest.weights.h5` and `training_metadata.json`.
        """
        # delete_checkpoint=False: re-running a finished run must find its final
        # state (and train nothing) rather than start from scratch.
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=False)
        self._preempted = False
        self._previous_handler = None

    def _save_model(self):
        """Keras' save, made atomic: a kill mid-write never leaves a half-written file.

        Keras writes `latest.weights.h5` and the metadata in place; here both go to
        temporary files first and are renamed (atomic on POSIX), the metadata last,
        so a restart always finds the last complete pair.
        """
        os.makedirs(self.backup_dir, exist_ok=True)
        temporary_weights = self._weights_path + ".tmp.weights.h5"
        self.model.save_weights(filepath=temporary_weights, overwrite=True)
        os.replace(temporary_weights, self._weights_path)
        temporary_metadata = self._training_metadata_path + ".tmp"
        with open(temporary_metadata, "w") as f:
            f.write(json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen}))
        os.replace(temporary_metadata, self._training_metadata_path)

    @staticmethod
    def completed_epochs(backup_dir):
        """Epochs recorded as completed in `backup_dir` (0 when there is no backup)."""
        path = os.path.join(backup_dir, "training_metadata.json")
        if not os.path.exists(path):
            return 0
        with open(path) as f:
            return int(json.load(f)["epoch"])

    def _handle_sigterm(self, signum, frame):
        del signum, frame
        self._preempted = True

    def install_signal_handler(self):
        """Catches SIGTERM (main thread only; a no-op elsewhere)."""
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._handle_sigterm)

    def uninstall_signal_handler(self):
        """Restores the SIGTERM handler that was there before `install_signal_handler`."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.install_signal_handler()

    def on_epoch_begin(self, epoch, logs=None):
        # Keras only sets _current_epoch at epoch ends, so after a resume it would
        # still be 0 during the first epoch; a SIGTERM there must record `epoch`.
        self._current_epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self._preempted:
            self._last_batch_seen = batch
            self._save_model()
            raise TrainingPreempted(
                f"SIGTERM received at epoch {self._current_epoch + 1}, step {batch + 1}: saved "
                f"the training state to {self.backup_dir}; run the same command again to "
                f"resume (epoch {self._current_epoch + 1} restarts from its first step)."
            )

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self._preempted:
            raise TrainingPreempted(
                f"SIGTERM received during epoch {epoch + 1}: saved the training state after "
                f"epoch {epoch + 1} to {self.backup_dir}; run the same command again to resume."
            )

    def on_train_end(self, logs=None):
        self.uninstall_signal_handler()
        super().on_train_end(logs)


def truncate_csv_log(path, completed_epochs):
    """Drops rows of epochs >= `completed_epochs` (0-based) from a CSVLogger file.

    A run killed after logging an epoch but before its checkpoint re-runs that
    epoch; this keeps every epoch in the log exactly once.
    """
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    kept = [row for row in body if row and int(row[0]) < completed_epochs]
    if len(kept) == len(body):
        return
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(kept)


class ResumableCSVLogger(keras.callbacks.CSVLogger):
    """CSVLogger whose columns are fixed: the existing header when appending, else
    every training key plus `val_` of each metric (NA in epochs without evaluation).
    """

    def __init__(self, filename, append=False, train_only_keys=("learning_rate",)):
        """Args:
        filename: the CSV file.
        append: continue an existing file (resume).
        train_only_keys: log keys that have no `val_` counterpart.
        """
        super().__init__(filename, append=append)
        self.train_only_keys = tuple(train_only_keys)

    def on_train_begin(self, logs=None):
        header = None
        if self.append and os.path.exists(self.filename):
            with open(self.filename, newline="") as f:
                header = next(csv.reader(f), None)
        super().on_train_begin(logs)
        if header:
            self.keys = header[1:]

    def on_epoch_end(self, epoch, logs=None):
        if self.keys is None:
            keys = set(logs or {})
            if not any(key.startswith("val_") for key in keys):
                keys |= {f"val_{key}" for key in keys if key not in self.train_only_keys}
            self.keys = sorted(keys)
        super().on_epoch_end(epoch, logs)


class LearningRateLogger(keras.callbacks.Callback):
    """Adds "learning_rate" (the optimizer's rate at the epoch's last step) to the logs.

    Place it before the CSV and TensorBoard loggers.
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = _as_float(self.model.optimizer.learning_rate)


def _plugin_metadata(plugin_name):
    """SummaryMetadata of a TensorBoard plugin ("scalars" or "images", content version 0)."""
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin_name)
    )


def write_scalar(name, value, step):
    """Writes a scalar summary to the default writer (as tf.summary.scalar)."""
    return tf.summary.write(
        name, tf.cast(value, tf.float32), step=step, metadata=_plugin_metadata("scalars")
    )


def write_images(name, images, step):
    """Writes an image summary to the default writer (as tf.summary.image).

    Args:
      name: tag.
      images: uint8 [N, H, W, 3].
      step: int64 step.
    """
    images = tf.convert_to_tensor(images, tf.uint8)
    encoded = tf.map_fn(tf.io.encode_png, images, fn_output_signature=tf.string)
    # The images plugin's tensor: [width, height, png_1, ..., png_N] as strings.
    shape = tf.strings.as_string(tf.shape(images)[1:3])
    tensor = tf.concat([[shape[1], shape[0]], encoded], axis=0)
    return tf.summary.write(name, tensor, step=step, metadata=_plugin_metadata("images"))


class EpochSummaries(keras.callbacks.Callback):
    """Writes the epoch logs as scalars "epoch_<key>": training keys to `log_dir/train`,
    `val_*` keys (without the prefix) to `log_dir/validation`, as Keras's TensorBoard.
    """

    def __init__(self, log_dir):
        """Args:
        log_dir: the TensorBoard directory.
        """
        super().__init__()
        self.log_dir = log_dir
        self._writers = {}

    def _writer(self, subdirectory):
        if subdirectory not in self._writers:
            self._writers[subdirectory] = tf.summary.create_file_writer(
                os.path.join(self.log_dir, subdirectory)
            )
        return self._writers[subdirectory]

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            subdirectory, name = "train", key
            if key.startswith("val_"):
                subdirectory, name = "validation", key[len("val_"):]
            with self._writer(subdirectory).as_default():
                write_scalar(f"epoch_{name}", _as_float(value), step=epoch + 1)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


class HeatmapSummary(keras.callbacks.Callback):
    """Writes Grad-CAM overlays of fixed images to TensorBoard every `every` epochs.

    The heatmaps are `model.explain(images)` for the predicted class; the image
    summary "heatmaps" shows each image next to its overlay
    (`cgc_tf.visualize.overlays`).
    """

    def __init__(self, images, log_dir, every=1):
        """Args:
        images: float32 [N, H, W, 3] in [0, 1], the images to explain.
        log_dir: TensorBoard directory of the summary writer.
        every: write after epochs whose 1-based index is a multiple of this.
        """
        super().__init__()
        self.images = tf.convert_to_tensor(images, tf.float32)
        self.log_dir = log_dir
        self.every = int(every)
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        heatmaps = self.model.explain(self.images)["heatmap"]
        overlays = visualize.overlays(self.images.numpy(), heatmaps.numpy())
        originals = np.round(self.images.numpy() * 255).astype(np.uint8)
        with self._writer.as_default():
            write_images("heatmaps", np.concatenate([originals, overlays], axis=2), step=epoch + 1)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
