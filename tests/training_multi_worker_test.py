"""Tests of run_training with strategy='multi_worker': two workers on localhost, and resume.

The chief (worker 0) runs the cgc-train binary (`python -m train.main
--strategy=multi_worker`). Worker 1 runs this file as a script: it parses the same
flags with the binary's own flag definitions and calls `run_training` with a
callback that saves its final weights outside model_dir, so the test can compare
them with the chief's model.keras. Both workers get the same TF_CONFIG cluster of
two free localhost ports. The second launch asks for one more epoch and must
resume from the chief's checkpoint.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from cgc_tf import config as config_lib
from cgc_tf import custom_loop
from cgc_tf import model_dir as layout
from cgc_tf import run_lock
from cgc_tf import training
from tests import multi_worker_test
from tests import testing_processes

_IMAGE_SIZE = 16
_STEPS_PER_EPOCH = 2
_RESULT_PREFIX = "worker result: "
_TRAIN_EXAMPLES = 5748  # the embedded dataset's train split
# One two-worker launch on a loaded 2-core machine: two TensorFlow start-ups, the
# embedded dataset's first build (first launch), two tiny epochs and the chief's
# final evaluation (~170 s of training and minutes of evaluation at load 14). A
# hung collective fails the test instead of the CI.
_RUN_TIMEOUT_SECONDS = 900


def _binary_flags(model_dir, data_dir, epochs, synchronized_batch_norm):
    return [
        f"--synchronized_batch_norm={synchronized_batch_norm}",
        f"--data_dir={data_dir}", f"--image_size={_IMAGE_SIZE}", "--batch_size=8",
        f"--steps_per_epoch={_STEPS_PER_EPOCH}", "--warmup_epochs=0", "--learning_rate=0.05",
        "--eval_every=1", "--noexport", "--strategy=multi_worker", f"--epochs={epochs}",
        f"--model_dir={model_dir}",
    ]


@pytest.mark.slow
class MultiWorkerTrainingTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.root = tempfile.mkdtemp(prefix="cgc_tf_training_multi_worker_test_")
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
        # Not prepared here: the chief builds the embedded dataset before the
        # other worker reads it (run_training's first barrier).
        self.data_dir = os.path.join(self.root, "tfds")
        self.model_dir = os.path.join(self.root, "run")

    def _launch(self, epochs, name, synchronized_batch_norm=False):
        """Runs both workers to the end (each must exit 0); returns their outputs [0, 1]."""
        ports = testing_processes.free_ports(2)
        flags = _binary_flags(self.model_dir, self.data_dir, epochs, synchronized_batch_norm)
        commands = [
            [sys.executable, "-m", "train.main", *flags],
            [sys.executable, os.path.abspath(__file__), self._weights_path(name), *flags],
        ]
        processes, logs = [], []
        for index, command in enumerate(commands):
            environment = testing_processes.worker_environment(
                ports,
                index,
                # Worker 1's temporary checkpoints: outside model_dir, inspected below.
                TMPDIR=self._tmp_dir(index),
            )
            os.makedirs(environment["TMPDIR"], exist_ok=True)
            log_path = os.path.join(self.root, f"{name}_worker_{index}.log")
            log = open(log_path, "w")
            self.addCleanup(log.close)
            logs.append(log_path)
            processes.append(
                subprocess.Popen(
                    command,
                    cwd=testing_processes.REPO,
                    env=environment,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        for process in processes:
            self.addCleanup(lambda p=process: p.poll() is None and p.kill())
        results = []
        for index, (process, log_path) in enumerate(zip(processes, logs)):
            try:
                returncode = process.wait(timeout=_RUN_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                for other in processes:
                    other.kill()
                returncode = None
            with open(log_path) as file:
                output = file.read()
            self.assertEqual(returncode, 0, f"{name}: worker {index}'s output:\n{output[-4000:]}")
            results.append(output)
        return results

    def _tmp_dir(self, index):
        return os.path.join(self.root, f"tmp_{index}")

    def _weights_path(self, name):
        return os.path.join(self.root, f"{name}_worker_1_weights.npz")

    def _worker_result(self, output):
        lines = [line for line in output.splitlines() if line.startswith(_RESULT_PREFIX)]
        self.assertLen(lines, 1, output[-4000:])
        return json.loads(lines[0][len(_RESULT_PREFIX):])

    def _check_weights_agree(self, name, epochs, moving_statistics):
        """Worker 1's final backbone weights equal the chief's model.keras; returns them.

        The trainable ones always; the BatchNorm moving statistics only when
        `moving_statistics` (synchronized BatchNorm): by default they are per
        replica (docs/distributed.md), and model.keras holds the chief's.
        """
        model = keras.models.load_model(os.path.join(self.model_dir, layout.MODEL_FILE))
        with np.load(self._weights_path(name)) as saved:
            trainable = saved["trainable"]
            weights = [saved[f"arr_{index}"] for index in range(len(trainable))]
            iterations = int(saved["iterations"])
        self.assertEqual(iterations, epochs * _STEPS_PER_EPOCH)
        chief_weights = [weight.numpy() for weight in model.backbone.weights]
        self.assertLen(weights, len(chief_weights))
        self.assertFalse(np.all(trainable))  # the BatchNorm moving statistics
        for worker_weight, chief_weight, is_trainable in zip(weights, chief_weights, trainable):
            if is_trainable or moving_statistics:
                self.assertAllEqual(worker_weight, chief_weight)
        return [weight for weight, is_trainable in zip(weights, trainable) if is_trainable]

    def _check_input_stats(self, num_workers):
        """Each worker decoded only its share of the embedded train split (5,748 images)."""
        directory = os.path.join(self.model_dir, layout.INPUT_STATS_DIR)
        self.assertCountEqual(
            os.listdir(directory), [f"worker-{index}.json" for index in range(num_workers)]
        )
        shares = []
        for index in range(num_workers):
            with open(os.path.join(directory, f"worker-{index}.json")) as file:
                stats = json.load(file)
            self.assertEqual((stats["num_shards"], stats["shard_index"]), (num_workers, index))
            # Each epoch's pipeline decodes the share once (its shuffle buffer holds
            # all of it, even for the two steps of an epoch here).
            epochs = stats["epochs_this_run"]
            self.assertEqual(stats["images_decoded"], epochs * stats["examples_per_epoch"])
            self.assertLessEqual(
                stats["images_decoded"] / epochs, 1.05 * _TRAIN_EXAMPLES / num_workers
            )
            shares.append(stats["examples_per_epoch"])
        self.assertEqual(sum(shares), _TRAIN_EXAMPLES)

    def _epochs_logged(self):
        rows = multi_worker_test._read_csv(os.path.join(self.model_dir, layout.LOG_FILE))
        return [int(row["epoch"]) for row in rows]

    def test_two_workers_train_write_once_and_resume(self):
        chief_output, worker_output = self._launch(
            epochs=2, name="first", synchronized_batch_norm=True
        )

        self.assertCountEqual(
            os.listdir(self.model_dir),
            ["config.json", "model.keras", layout.BACKBONE_WEIGHTS_FILE, "metrics.json",
             "log.csv", "checkpoints", "tensorboard",
             layout.INPUT_STATS_DIR,  # every worker's own file
             run_lock.LOCK_FILE],  # the chief's lock; the other worker takes none
        )
        self._check_input_stats(num_workers=2)
        self.assertEqual(self._epochs_logged(), [0, 1])
        checkpoint_dir = os.path.join(self.model_dir, layout.MULTI_WORKER_DIR)
        self.assertEqual(custom_loop.completed_epochs(checkpoint_dir), 2)
        self.assertEqual(os.listdir(os.path.join(self.model_dir, "checkpoints")), ["multi_worker"])
        with open(os.path.join(self.model_dir, layout.METRICS_FILE)) as file:
            metrics = json.load(file)
        self.assertEqual((metrics["epochs"], metrics["epochs_run_this_time"]), (2, 2))
        self.assertBetween(metrics["accuracy"], 0.0, 1.0)
        self.assertIn(f"test accuracy: {metrics['accuracy']:.4f}", chief_output)
        tensorboard = os.path.join(self.model_dir, "tensorboard")
        self.assertCountEqual(os.listdir(tensorboard), ["train", "heatmaps"])
        # Worker 1: run_training returned None, printed no summary, and deleted
        # its temporary checkpoint directory.
        self.assertIsNone(self._worker_result(worker_output)["metrics"])
        self.assertNotIn("accuracy", worker_output)
        self.assertEqual(os.listdir(self._tmp_dir(1)), [])
        first_weights = self._check_weights_agree("first", epochs=2, moving_statistics=True)

        chief_output, worker_output = self._launch(epochs=3, name="resumed")

        self.assertIn(f"Resuming from {checkpoint_dir}: 2 of 3 epochs done", chief_output)
        self.assertNotIn("Resuming from", worker_output)
        self.assertEqual(self._epochs_logged(), [0, 1, 2])
        self.assertEqual(custom_loop.completed_epochs(checkpoint_dir), 3)
        with open(os.path.join(self.model_dir, layout.METRICS_FILE)) as file:
            metrics = json.load(file)
        self.assertEqual((metrics["epochs"], metrics["epochs_run_this_time"]), (3, 1))
        resumed_weights = self._check_weights_agree("resumed", epochs=3, moving_statistics=False)
        moved = max(np.abs(a - b).max() for a, b in zip(first_weights, resumed_weights))
        self.assertGreater(moved, 0.0)


class CheckpointKindTest(tf.test.TestCase):

    def test_fit_strategies_refuse_a_multi_worker_checkpoint(self):
        model_dir = self.get_temp_dir()
        manager = tf.train.CheckpointManager(
            tf.train.Checkpoint(epoch=tf.Variable(2, dtype=tf.int64)),
            os.path.join(model_dir, layout.MULTI_WORKER_DIR),
            max_to_keep=1,
        )
        manager.save()
        self.assertEqual(
            custom_loop.completed_epochs(os.path.join(model_dir, layout.MULTI_WORKER_DIR)), 2
        )
        config = config_lib.TrainConfig(model_dir=model_dir)
        with self.assertRaisesRegex(
            training.ConfigurationError,
            r"checkpoint of a strategy='multi_worker' run .* strategy='default' cannot resume",
        ):
            training.run_training(config, progress=False)

    def test_no_checkpoint_means_no_completed_epochs(self):
        self.assertEqual(custom_loop.completed_epochs(os.path.join(self.get_temp_dir(), "none")), 0)


class _SaveWeightsOnTrainEnd(keras.callbacks.Callback):
    """Saves the backbone's weights (arr_0, ...), which are trainable, and the optimizer
    iterations at the end of training."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_train_end(self, logs=None):
        weights = self.model.backbone.weights
        np.savez(
            self.path, *[weight.numpy() for weight in weights],
            trainable=np.array([weight.trainable for weight in weights]),
            iterations=int(self.model.optimizer.iterations.numpy()),
        )


def _worker_main(argv):
    """Worker 1: argv is the weights path, then the cgc-train flags."""
    from absl import flags
    from train import main as train_main

    weights_path, flag_arguments = argv[0], argv[1:]
    flags.FLAGS(["cgc-train", *flag_arguments])
    config = train_main.config_from_flags()
    metrics = training.run_training(config, callbacks=[_SaveWeightsOnTrainEnd(weights_path)])
    print(_RESULT_PREFIX + json.dumps({"metrics": metrics}), flush=True)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
