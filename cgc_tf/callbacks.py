"""Keras callbacks of `cgc_tf.training`: failure handling, resumable logs, heatmaps.

What: `StopOnNonFiniteLoss`, `PreemptibleBackupAndRestore`, `AtomicModelCheckpoint`
(both write through `model_dir.atomic_write_path`), `ResumableCSVLogger`,
`LearningRateLogger`, `EpochSummaries`, `HeatmapSummary`. Why: Keras's own callbacks
save NaN weights after `TerminateOnNaN`, leave torn checkpoints when killed and need
the `tensorboard` package for summaries; docs/robustness.md describes what each of
these does instead.
"""

import csv
import fnmatch
import json
import math
import os
import shutil
import signal
import threading

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from cgc_tf import visualize
from cgc_tf.model_dir import atomic_write_path
from cgc_tf.model_dir import remove_if_exists
from cgc_tf.model_dir import write_json

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


class AtomicModelCheckpoint(keras.callbacks.Callback):
    """Saves the full model (`model.save`: config, weights, optimizer state) after every epoch.

    `keras.callbacks.ModelCheckpoint(filepath)` writes the file in place, so a
    kill mid-save leaves a truncated zip; here a kill leaves the previous
    epoch's complete file.
    """

    def __init__(self, filepath):
        """Args:
        filepath: destination ending in ".keras", overwritten every epoch.
        """
        super().__init__()
        if not str(filepath).endswith(".keras"):
            raise ValueError(
                f"filepath={filepath!r} must end in '.keras', the format of model.save"
            )
        self.filepath = str(filepath)

    def on_epoch_end(self, epoch, logs=None):
        with atomic_write_path(self.filepath) as temporary_path:
            self.model.save(temporary_path)


class PreemptibleBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore (save every epoch, keep the files) that survives kills and SIGTERM.

    Files in `backup_dir`:

        epoch-0003.weights.h5   the state after 3 epochs (or, saved at a
                                SIGTERM, epoch-0003-step-000005.weights.h5:
                                after 3 epochs and 5 steps of the 4th)
        training_metadata.json  {"epoch": 3, "batch": 0, "weights": "epoch-0003.weights.h5"}
        latest.weights.h5       a hard link to (or copy of) that weights file:
                                never write to it in place

    What is saved is `model.save_weights` (Keras 3.15, as BackupAndRestore):
    every variable of the model's layers (BatchNorm moving statistics included)
    and of `model.optimizer`: `iterations` (which drives the learning-rate
    schedule), the momentum slots and, under mixed_float16, the loss scale. Not
    saved: metric states (reset every epoch), the position in the input pipeline
    (a resumed run starts a new epoch with another shuffling seed) and random
    generator states.

    A save writes the weights file under a new name (temporary file, then
    rename), then replaces the metadata atomically (the commit point), then
    updates `latest.weights.h5` and deletes older weights files. The metadata
    always names a complete weights file of the epoch it states, whenever the
    process is killed, and a resume reads that file (never `latest.weights.h5`,
    which can lag one save behind after a kill).

    On SIGTERM the current weights and optimizer state are saved at the end of
    the running batch, marked as belonging to the unfinished epoch, and
    `TrainingPreempted` is raised. A resumed run restarts that epoch from its
    first batch with the saved (partly trained) weights: Keras restores whole
    epochs only. A SIGTERM during validation saves after the epoch completes.
    """

    METADATA_FILE = "training_metadata.json"

    def __init__(self, backup_dir):
        """Args:
        backup_dir: directory of the checkpoint files (see the class docstring).
        """
        # delete_checkpoint=False: re-running a finished run must find its final
        # state (and train nothing) rather than start from scratch.
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=False)
        self._preempted = False
        self._previous_handler = None

    def _load_model(self):
        """Restores the weights file that the metadata names and the epoch to start from."""
        if not self.model.built:
            raise ValueError(
                f"model {self.model.name!r} is not built; PreemptibleBackupAndRestore needs a "
                "built model before fit(): call it on a batch first"
            )
        metadata = self.read_metadata(self.backup_dir)
        if metadata is None:
            return
        # Metadata of the earlier format has no "weights": it went with latest.weights.h5.
        weights_path = os.path.join(self.backup_dir, metadata.get("weights", "latest.weights.h5"))
        if not os.path.exists(weights_path):
            raise FileNotFoundError(
                f"{self._training_metadata_path} names the weights file {weights_path}, which "
                "does not exist; restore it, or start over with resume=False (--noresume)"
            )
        if self.model.optimizer is not None and not self.model.optimizer.built:
            # The optimizer's variables must exist to receive the saved values.
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(weights_path)
        self.model._initial_epoch = int(metadata["epoch"])

    def _save_model(self, steps_in_epoch=0):
        """Saves the weights and the metadata naming them, consistent under a kill at any point.

        Args:
          steps_in_epoch: steps done in the unfinished epoch (SIGTERM saves), else 0.
        """
        name = f"epoch-{self._current_epoch:04d}"
        if steps_in_epoch:
            name += f"-step-{steps_in_epoch:06d}"
        weights_file = name + ".weights.h5"
        weights_path = os.path.join(self.backup_dir, weights_file)
        with atomic_write_path(weights_path) as temporary_path:
            self.model.save_weights(temporary_path, overwrite=True)
        metadata = {
            "epoch": self._current_epoch,
            "batch": self._last_batch_seen,
            "weights": weights_file,
        }
        write_json(self._training_metadata_path, metadata)
        # Committed. The rest only tidies up: a kill from here on leaves the
        # previous weights file and latest.weights.h5 behind, both complete.
        with atomic_write_path(self._weights_path) as temporary_path:
            try:
                os.link(weights_path, temporary_path)
            except OSError:  # File systems without hard links.
                shutil.copyfile(weights_path, temporary_path)
        for stale in fnmatch.filter(os.listdir(self.backup_dir), "epoch-*.weights.h5"):
            if stale != weights_file:
                remove_if_exists(os.path.join(self.backup_dir, stale))

    @classmethod
    def read_metadata(cls, backup_dir):
        """The committed metadata dict of `backup_dir`, or None when there is no checkpoint."""
        path = os.path.join(backup_dir, cls.METADATA_FILE)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    @classmethod
    def completed_epochs(cls, backup_dir):
        """Epochs recorded as completed in `backup_dir` (0 when there is no backup)."""
        metadata = cls.read_metadata(backup_dir)
        return 0 if metadata is None else int(metadata["epoch"])

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
            self._save_model(steps_in_epoch=batch + 1)
            # fit() skips on_train_end when a callback raises: restore the handler here.
            self.uninstall_signal_handler()
            raise TrainingPreempted(
                f"SIGTERM received at epoch {self._current_epoch + 1}, step {batch + 1}: saved "
                f"the training state to {self.backup_dir}; run the same command again to "
                f"resume (epoch {self._current_epoch + 1} restarts from its first step)."
            )

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self._preempted:
            self.uninstall_signal_handler()
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
    epoch; this keeps every epoch in the log exactly once. The file is replaced
    atomically, so a kill here loses no row.
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
    with atomic_write_path(path) as temporary_path:
        with open(temporary_path, "w", newline="") as f:
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
