"""Tests of the cgc-train binary (train/main.py) in subprocesses: flags, kill/resume, SIGTERM."""

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import tensorflow as tf

from cgc_tf import config as config_lib
from cgc_tf import data
from tests import testing_processes

CONFIGS = os.path.join(testing_processes.REPO, "train", "configs")
IMAGE_SIZE = 32
TIMEOUT_SECONDS = 240

_FLAGFILE_PROBE = """
import json, sys
from absl import flags
from train import main
result = {}
for path in sys.argv[1:]:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["cgc-train", "--flagfile=" + path])
    result[path] = json.loads(main.config_from_flags().to_json())
result["flag_names"] = sorted(holder.name for holder in main._CONFIG_FLAGS.values())
print(json.dumps(result))
"""


def _read_epochs(model_dir):
    with open(os.path.join(model_dir, "log.csv"), newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def _completed_epochs(model_dir):
    path = os.path.join(model_dir, "checkpoints", "backup", "training_metadata.json")
    try:
        with open(path) as f:
            return json.load(f)["epoch"]
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
class TrainBinaryTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.data_dir = tempfile.mkdtemp(prefix="cgc_train_binary_test_tfds_")
        data.dataset_info("cluttered_digits", data_dir=cls.data_dir, image_size=IMAGE_SIZE)

    def command(self, model_dir, *extra):
        return [
            sys.executable, "-m", "train.main",
            f"--data_dir={self.data_dir}", f"--image_size={IMAGE_SIZE}", "--batch_size=8",
            "--steps_per_epoch=2", "--warmup_epochs=0", "--learning_rate=0.01",
            "--eval_every=1000", "--noexport", f"--model_dir={model_dir}", *extra,
        ]

    def run_binary(self, arguments):
        return subprocess.run(
            arguments,
            cwd=testing_processes.REPO,
            env=testing_processes.subprocess_environment(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS,
        )

    def start(self, arguments, name):
        log_dir = self.get_temp_dir()
        stdout = open(os.path.join(log_dir, f"{name}.out"), "w")
        stderr_path = os.path.join(log_dir, f"{name}.err")
        stderr = open(stderr_path, "w")
        process = subprocess.Popen(
            arguments,
            cwd=testing_processes.REPO,
            env=testing_processes.subprocess_environment(),
            stdout=stdout,
            stderr=stderr,
        )
        self.addCleanup(stdout.close)
        self.addCleanup(stderr.close)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        return process, stderr_path

    def wait_for(self, condition, process, what):
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while not condition():
            if process.poll() is not None:
                self.fail(f"the binary exited with {process.returncode} before {what}")
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            time.sleep(0.2)

    def test_bad_flags_give_one_readable_error(self):
        model_dir = os.path.join(self.get_temp_dir(), "bad")
        result = self.run_binary(
            self.command(model_dir, "--temperature=0", "--lambda=-1", "--epochs=0")
        )
        self.assertEqual(result.returncode, 1)
        self.assertNotIn("Traceback", result.stderr)
        for fragment in ("temperature=0.0 must be > 0", "lambda_=-1.0 must be >= 0",
                         "epochs=0 must be an integer >= 1"):
            self.assertIn(fragment, result.stderr)
        result = self.run_binary(self.command(model_dir, "--arch=vgg16"))
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn("vgg16", result.stderr)

    def test_flagfiles_parse_and_main_job_matches_defaults(self):
        paths = sorted(
            os.path.join(CONFIGS, name) for name in os.listdir(CONFIGS) if name.endswith(".cfg")
        )
        result = self.run_binary([sys.executable, "-c", _FLAGFILE_PROBE, *paths])
        self.assertEqual(result.returncode, 0, result.stderr)
        parsed = json.loads(result.stdout.splitlines()[-1])
        self.assertEqual(
            parsed.pop("flag_names"),
            sorted(field.name for field in dataclasses.fields(config_lib.TrainConfig)),
        )
        configs = {
            os.path.basename(path): config_lib.TrainConfig(**values)
            for path, values in parsed.items()
        }
        self.assertEqual(configs["cluttered_digits.cfg"], config_lib.TrainConfig())
        imagenet = configs["imagenet_resnet50.cfg"]
        self.assertEqual(
            (imagenet.arch, imagenet.learning_rate, imagenet.momentum, imagenet.weight_decay,
             imagenet.batch_size, imagenet.lr_schedule, imagenet.lr_decay_epochs,
             imagenet.epochs, imagenet.lambda_, imagenet.temperature, imagenet.views,
             imagenet.transform_min_area),
            ("resnet50", 0.1, 0.9, 1e-4, 256, "step", 30, 90, 0.5, 0.5, 3, 0.08),
        )
        self.assertEqual(configs["cluttered_digits_limited.cfg"].examples_per_class, 30)
        self.assertEqual(configs["cluttered_digits_semi.cfg"].examples_per_class, 30)
        self.assertEqual(configs["cluttered_digits_semi.cfg"].unlabeled, "cluttered_digits")
        for name in ("cub200.cfg", "fgvc_aircraft.cfg", "stanford_cars.cfg", "vgg_flowers.cfg"):
            self.assertEqual(configs[name].arch, "resnet50", name)

    def test_kill_and_resume_continues_from_last_completed_epoch(self):
        model_dir = os.path.join(self.get_temp_dir(), "killed")
        command = self.command(model_dir, "--epochs=4")
        process, _ = self.start(command, "killed")
        self.wait_for(lambda: _completed_epochs(model_dir) >= 1, process, "the first checkpoint")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=TIMEOUT_SECONDS)
        completed = _completed_epochs(model_dir)
        self.assertBetween(completed, 1, 3)

        result = self.run_binary(command)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Resuming from", result.stdout)
        self.assertEqual(_read_epochs(model_dir), [0, 1, 2, 3])
        with open(os.path.join(model_dir, "metrics.json")) as f:
            metrics = json.load(f)
        self.assertEqual(metrics["epochs_run_this_time"], 4 - completed)
        self.assertIn(f"test accuracy: {metrics['accuracy']:.4f}", result.stdout)
        self.assertIn(os.path.abspath(model_dir), result.stdout)
        with open(os.path.join(model_dir, "config.json")) as f:
            config = config_lib.TrainConfig.from_json(f.read())
        self.assertEqual((config.epochs, config.batch_size, config.export), (4, 8, False))

    def test_sigterm_saves_checkpoint_and_exits_cleanly(self):
        model_dir = os.path.join(self.get_temp_dir(), "preempted")
        process, stderr_path = self.start(self.command(model_dir, "--epochs=1000"), "preempted")
        self.wait_for(lambda: _completed_epochs(model_dir) >= 1, process, "the first checkpoint")
        weights = os.path.join(model_dir, "checkpoints", "backup", "latest.weights.h5")
        before = os.stat(weights).st_mtime_ns
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=TIMEOUT_SECONDS)
        with open(stderr_path) as f:
            stderr = f.read()
        self.assertEqual(returncode, 128 + signal.SIGTERM, stderr)
        self.assertIn("SIGTERM received", stderr)
        self.assertNotIn("Traceback", stderr)
        self.assertGreater(os.stat(weights).st_mtime_ns, before)
        self.assertFalse(os.path.exists(os.path.join(model_dir, "model.keras")))


if __name__ == "__main__":
    tf.test.main()
