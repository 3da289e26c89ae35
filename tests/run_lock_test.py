"""run_lock: one training process per model_dir, released however the holder ends."""

import os
import signal
import subprocess
import sys
import tempfile

import tensorflow as tf

from cgc_tf import config as config_lib
from cgc_tf import model_dir as layout
from cgc_tf import run_lock
from cgc_tf import training
from tests import testing_processes

# Holds the lock of argv[1], says so, then waits to be killed.
_HOLDER = """
import sys, time
from cgc_tf import run_lock
with run_lock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


class RunLockTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.model_dir = tempfile.mkdtemp()

    def _start_holder(self):
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, self.model_dir],
            stdout=subprocess.PIPE, text=True, cwd=testing_processes.REPO,
            env=testing_processes.subprocess_environment(),
        )
        self.addCleanup(holder.kill)
        self.assertEqual(holder.stdout.readline().strip(), "held")
        return holder

    def test_second_holder_is_refused_with_the_first_one_pid(self):
        holder = self._start_holder()
        with self.assertRaisesRegex(run_lock.ModelDirInUseError, f"PID {holder.pid}"):
            with run_lock.hold(self.model_dir):
                pass

    def test_released_when_the_holder_is_killed(self):
        holder = self._start_holder()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with run_lock.hold(self.model_dir):
            with open(os.path.join(self.model_dir, run_lock.LOCK_FILE)) as f:
                self.assertEqual(f.read(), str(os.getpid()))

    def test_released_after_the_block_in_the_same_process(self):
        with run_lock.hold(self.model_dir):
            pass
        with run_lock.hold(self.model_dir):
            pass

    def test_run_training_refuses_a_model_dir_in_use_before_any_work(self):
        holder = self._start_holder()
        config = config_lib.TrainConfig(model_dir=self.model_dir, epochs=1, steps_per_epoch=1)
        with self.assertRaisesRegex(ValueError, f"in use by another training process .PID {holder.pid}"):
            training.run_training(config, progress=False)
        self.assertFalse(os.path.exists(os.path.join(self.model_dir, layout.CONFIG_FILE)))


if __name__ == "__main__":
    tf.test.main()
