"""Tests of cgc_tf/console.py: which stderr lines are hidden, and a quiet cgc-train run."""

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

import pytest
import tensorflow as tf

from cgc_tf import console

# Lines TensorFlow 2.21 printed on a CPU-only machine, as captured from `import tensorflow`.
_INITIALIZE_LOG = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
)
_ONEDNN = (
    "I0000 00:00:1796478826.223926   26219 port.cc:153] oneDNN custom operations are on. "
    "You may see slightly different numerical results due to floating-point round-off errors "
    "from different computation orders. To turn them off, set the environment variable "
    "`TF_ENABLE_ONEDNN_OPTS=0`.\n"
)
_NO_DRIVERS = (
    "I0000 00:00:1796478826.224205   26219 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.\n"
)
_CPU_GUARD = (
    "I0000 00:00:1796478848.244403   26724 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.\n"
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow "
    "with the appropriate compiler flags.\n"
)
_CUINIT = (
    "E0000 00:00:1796478991.000968   30431 cuda_platform.cc:52] failed call to cuInit: "
    "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
)
_WARNING_AFTER_INIT = "W1205 13:56:31.002515  1398 some_kernel.cc:12] a warning\n"
_REAL_ERROR = "E1205 13:56:31.002515  1398 some_kernel.cc:12] OOM when allocating tensor\n"
_OURS = "cgc-train: 1 CPU visible, strategy default\n"
_NOISE = _INITIALIZE_LOG + _ONEDNN + _NO_DRIVERS + _CPU_GUARD + _CUINIT + _WARNING_AFTER_INIT


@contextlib.contextmanager
def _captured_fd2():
    """Captures what is written to file descriptor 2 (C code and sys.stderr) as a list."""
    sys.stderr.flush()
    saved = os.dup(2)
    result = []
    # sys.stderr on fd 2, as in a binary (pytest points sys.stderr elsewhere).
    with tempfile.TemporaryFile() as capture, open(2, "w", closefd=False) as fd2:
        os.dup2(capture.fileno(), 2)
        try:
            with mock.patch.object(sys, "stderr", fd2):
                yield result
        finally:
            fd2.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            result.append(capture.read().decode())


class StartupNoiseTest(tf.test.TestCase):
    def test_default_level_hides_tensorflow_startup_lines_only(self):
        lines = (_NOISE + _REAL_ERROR + _OURS).splitlines(keepends=True)
        kept = [line for line in lines if not console.is_startup_noise(line)]
        self.assertEqual(kept, [_REAL_ERROR, _OURS])

    def test_levels_follow_tf_cpp_min_log_level(self):
        lines = _NOISE.splitlines(keepends=True)
        shown = {
            level: [line for line in lines if not console.is_startup_noise(line, level)]
            for level in (0, 1, 3)
        }
        self.assertEqual(shown[0], lines)
        # Level 1 shows the errors of CPU-only machines too: only 2 and up hide them.
        self.assertEqual(shown[1], [_CUINIT, _WARNING_AFTER_INIT])
        self.assertEqual(shown[3], [])

    def test_quiet_stderr_filters_the_file_descriptor(self):
        with mock.patch.dict(os.environ, {"TF_CPP_MIN_LOG_LEVEL": "2"}):
            with _captured_fd2() as written:
                with console.quiet_stderr():
                    # As TensorFlow's C++ logging does: straight to fd 2, not sys.stderr.
                    os.write(2, (_NOISE + _REAL_ERROR).encode())
                    print(_OURS, end="", file=sys.stderr)
        self.assertEqual(written, [_REAL_ERROR + _OURS])

    def test_quiet_stderr_level_zero_filters_nothing(self):
        with mock.patch.dict(os.environ, {"TF_CPP_MIN_LOG_LEVEL": "0"}):
            with _captured_fd2() as written:
                with console.quiet_stderr():
                    os.write(2, _NOISE.encode())
        self.assertEqual(written, [_NOISE])

    def test_quiet_stderr_replays_when_the_block_raises(self):
        with _captured_fd2() as written:
            with self.assertRaisesRegex(RuntimeError, "boom"):
                with console.quiet_stderr():
                    os.write(2, (_CUINIT + _OURS).encode())
                    raise RuntimeError("boom")
        self.assertEqual(written, [_OURS])


class SetupTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        # A handler on the root logger, as absl's app.run installs one.
        self.handler = logging.StreamHandler()
        logging.getLogger().addHandler(self.handler)

    def tearDown(self):
        logging.getLogger().removeHandler(self.handler)
        for name in ("absl", "tensorflow"):
            logging.getLogger(name).removeFilter(console._ours_or_error)
        for handler in logging.getLogger("tensorflow").handlers:
            handler.removeFilter(console._ours_or_error)
        super().tearDown()

    def _passes(self, logger, level, pathname):
        record = logging.LogRecord(logger, level, pathname, 1, "message", None, None)
        return bool(logging.getLogger(logger).filter(record))

    def test_hides_other_libraries_records_below_error(self):
        self.assertIn("CPU", console.setup())
        library = os.path.join(os.path.dirname(tf.__file__), "python", "util", "deprecation.py")
        ours = os.path.join(os.path.dirname(console.__file__), "data", "sources.py")
        for logger in ("absl", "tensorflow"):
            self.assertFalse(self._passes(logger, logging.INFO, library))
            self.assertFalse(self._passes(logger, logging.WARNING, library))
            self.assertTrue(self._passes(logger, logging.ERROR, library))
            self.assertTrue(self._passes(logger, logging.WARNING, ours))
        # Records of other libraries' loggers (tf2onnx) reach the root's handlers.
        tf2onnx = logging.LogRecord("tf2onnx", logging.INFO, library, 1, "message", None, None)
        self.assertFalse(self.handler.filter(tf2onnx))
        console.setup()  # twice: still one filter
        self.assertEqual(logging.getLogger("absl").filters.count(console._ours_or_error), 1)

    def test_verbose_hides_nothing(self):
        console.setup(verbose=True)
        library = os.path.join(os.path.dirname(tf.__file__), "python", "util", "deprecation.py")
        self.assertTrue(self._passes("absl", logging.INFO, library))


# Lines a normal run must not print (TensorFlow C++ start-up, tfds INFO, deprecations).
_NOISE_PATTERNS = (
    r"Could not find cuda drivers", r"failed call to cuInit", r"oneDNN custom operations",
    r"absl::InitializeLog", r"dataset_builder\.py", r"dataset_info\.py",
    r"FeatureConnector\.dtype is deprecated", r"Sharding callback duration",
    r"is deprecated", r"AutoGraph could not transform", r"^[IW]\d{4} ",
)


@pytest.mark.slow
class QuietRunTest(tf.test.TestCase):
    def test_cgc_train_prints_only_its_own_lines(self):
        binary = shutil.which("cgc-train")
        if binary is None:
            self.skipTest("cgc-tf is not pip-installed")
        model_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
        result = subprocess.run(
            [binary, "--epochs=1", "--steps_per_epoch=1", "--batch_size=4", "--image_size=32",
             "--export=false", "--eval_every=1", f"--model_dir={model_dir}"],
            capture_output=True, text=True, check=False, env=environment, timeout=600,
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output[-3000:])
        for pattern in _NOISE_PATTERNS:
            self.assertNotRegex(output, re.compile(pattern, re.M))
        self.assertRegex(output, r"cgc-train: \d+ CPU visible, strategy default\n")
        self.assertRegex(output, r"Precision: (float32|mixed_bfloat16) \(auto: ")
        self.assertIn("Trained 1 epochs", output)
        # The final explanation evaluation reports its progress (steps_per_epoch=1: 4 images).
        self.assertRegex(
            output, r"Explanation metrics: 4 images in \d+ s \(grad-cam \d+ s, "
            r"insertion/deletion \d+ s, consistency \d+ s\)\n"
        )
        self.assertRegex(output, r"Consistency at the given transforms: 4 images in \d+ s")
        self.assertIn(f"Outputs in {model_dir}", output)


if __name__ == "__main__":
    tf.test.main()
