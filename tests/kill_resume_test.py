"""SIGKILL a training subprocess at chosen instants, restart it, check that it resumes (issue #8).

One model_dir goes through a chain of runs with the same TrainConfig, each
killed at another instant: mid-epoch, inside the checkpoint protocol of
`PreemptibleBackupAndRestore` (weights written to the temporary file; weights
renamed but the metadata not yet) and right after a checkpoint; the last run
finishes. Chaining costs one subprocess per kill instead of two (each costs
~15 s of CPU, mostly importing TensorFlow) and also covers repeated resumes.
After every kill the checkpoint must be complete and consistent: the metadata
names a weights file that opens, whose optimizer step count is the stated
epochs x steps_per_epoch; and the next run must print that it resumes from
exactly those epochs. tests/callbacks_test.py interrupts every other step of
the protocol in-process.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile

import h5py
import pytest
import tensorflow as tf

from cgc_tf import config as config_lib
from cgc_tf import data
from tests import testing_processes

IMAGE_SIZE = 16
STEPS_PER_EPOCH = 2
EPOCHS = 3
TIMEOUT_SECONDS = 240

# Runs `run_training(config)` with a SIGKILL at the instant `point`, concerning
# the checkpoint written after `epochs` completed epochs (mid_epoch: during the
# epoch after `epochs` completed ones). The process kills itself so that the
# instant is exact. Fault injection wraps model_dir._commit, the one rename
# step of every atomic write.
_RUNNER = """
import json, os, signal, sys
import keras
from cgc_tf import config as config_lib, model_dir, training

config = config_lib.TrainConfig.from_json(sys.argv[1])
point, epochs = sys.argv[2], int(sys.argv[3])
weights_file = f"epoch-{epochs:04d}.weights.h5"

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

def states_epochs(temporary_path):
    with open(temporary_path) as f:
        return json.load(f)["epoch"] == epochs

real_commit = model_dir._commit

def commit(temporary_path, path):
    name = os.path.basename(path)
    if name == weights_file and point == "weights_written":
        kill()
    if name == "training_metadata.json" and point == "weights_renamed":
        if states_epochs(temporary_path):
            kill()
    real_commit(temporary_path, path)

model_dir._commit = commit

class Kill(keras.callbacks.Callback):
    # Extra callbacks of run_training run after its checkpoint callbacks.
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if point == "mid_epoch" and self.epoch == epochs and batch == 0:
            kill()  # After the first of the epoch's steps.

    def on_epoch_end(self, epoch, logs=None):
        if point == "checkpoint_complete" and epoch + 1 == epochs:
            kill()

training.run_training(config, callbacks=[Kill()])
"""

# (kill point, checkpoint it concerns, completed epochs after the kill, the
# unreferenced files that show the kill came at that point of the protocol).
_CHAIN = (
    ("mid_epoch", 1, 1, ()),
    ("weights_written", 2, 1, ("epoch-0002.partial.weights.h5",)),
    ("weights_renamed", 2, 1, ("epoch-0002.weights.h5", "training_metadata.partial.json")),
    ("checkpoint_complete", 2, 2, ()),
)


def _optimizer_iterations(weights_path):
    """The optimizer step count stored in a .weights.h5 file (opening it checks it is whole)."""
    with h5py.File(weights_path, "r") as f:
        return int(f["optimizer/vars/0"][()])


def _logged_epochs(model_dir):
    path = os.path.join(model_dir, "log.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


@pytest.mark.slow
class KillResumeTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.data_dir = tempfile.mkdtemp(prefix="cgc_kill_resume_test_tfds_")
        cls.addClassCleanup(shutil.rmtree, cls.data_dir, ignore_errors=True)
        data.dataset_info("cluttered_digits", data_dir=cls.data_dir, image_size=IMAGE_SIZE)

    def run_training(self, config, point="none", epochs=0):
        return subprocess.run(
            [sys.executable, "-u", "-c", _RUNNER, config.to_json(), point, str(epochs)],
            cwd=testing_processes.REPO, env=testing_processes.subprocess_environment(),
            capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
        )

    def assert_consistent_checkpoint(self, model_dir, completed, point, unreferenced):
        backup_dir = os.path.join(model_dir, "checkpoints", "backup")
        self.assertCountEqual(
            os.listdir(backup_dir),
            ["training_metadata.json", f"epoch-{completed:04d}.weights.h5", "latest.weights.h5",
             *unreferenced],
            point,
        )
        with open(os.path.join(backup_dir, "training_metadata.json")) as f:
            metadata = json.load(f)
        self.assertEqual(metadata["epoch"], completed, point)
        self.assertEqual(metadata["weights"], f"epoch-{completed:04d}.weights.h5", point)
        # The weights are those of the stated epoch, optimizer included.
        self.assertEqual(
            _optimizer_iterations(os.path.join(backup_dir, metadata["weights"])),
            completed * STEPS_PER_EPOCH, point,
        )
        self.assertEqual(
            _optimizer_iterations(os.path.join(backup_dir, "latest.weights.h5")),
            completed * STEPS_PER_EPOCH, point,
        )
        with zipfile.ZipFile(os.path.join(model_dir, "checkpoints", "last_epoch.keras")) as f:
            self.assertIsNone(f.testzip(), point)
        logged = _logged_epochs(model_dir)
        self.assertEqual(logged, list(range(len(logged))), point)
        self.assertIn(len(logged), (completed, completed + 1), point)

    def test_killed_runs_resume_from_the_last_complete_checkpoint(self):
        model_dir = os.path.join(self.get_temp_dir(), "run")
        config = config_lib.TrainConfig(
            data_dir=self.data_dir, image_size=IMAGE_SIZE, batch_size=4,
            steps_per_epoch=STEPS_PER_EPOCH, epochs=EPOCHS, warmup_epochs=0,
            learning_rate=0.01, eval_every=1000, export=False, model_dir=model_dir,
        )
        backup_dir = os.path.join(model_dir, "checkpoints", "backup")
        completed = 0
        for point, checkpoint, completed_after, unreferenced in _CHAIN:
            result = self.run_training(config, point, checkpoint)
            self.assertEqual(result.returncode, -signal.SIGKILL, f"{point}: {result.stderr}")
            if completed:
                self.assertIn(
                    f"Resuming from {backup_dir}: {completed} of {EPOCHS} epochs done",
                    result.stdout, point,
                )
            else:
                self.assertNotIn("Resuming from", result.stdout)
            completed = completed_after
            self.assert_consistent_checkpoint(model_dir, completed, point, unreferenced)

        result = self.run_training(config)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"Resuming from {backup_dir}: {completed} of {EPOCHS} epochs done",
                      result.stdout)
        self.assertEqual(_logged_epochs(model_dir), list(range(EPOCHS)))
        with open(os.path.join(model_dir, "metrics.json")) as f:
            self.assertEqual(json.load(f)["epochs_run_this_time"], EPOCHS - completed)
        # Every resumed run continued the optimizer exactly where the checkpoint was.
        self.assertEqual(
            _optimizer_iterations(os.path.join(backup_dir, "latest.weights.h5")),
            EPOCHS * STEPS_PER_EPOCH,
        )
        self.assertCountEqual(
            os.listdir(backup_dir),
            ["training_metadata.json", f"epoch-{EPOCHS:04d}.weights.h5", "latest.weights.h5"],
        )


if __name__ == "__main__":
    tf.test.main()
