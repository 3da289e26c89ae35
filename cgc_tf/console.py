"""Quiet console output: TensorFlow's start-up notices and other libraries' INFO lines hidden.

`quiet_stderr` filters file descriptor 2 around TensorFlow's import (its C++ start-up
lines precede TF_CPP_MIN_LOG_LEVEL); `setup` hides other libraries' log records in the
binaries. A TF_CPP_MIN_LOG_LEVEL or --verbosity the user sets wins. Standard library
only: cgc_tf/__init__.py imports this module before TensorFlow. See docs/architecture.md.
"""

import collections
import contextlib
import logging
import os
import re
import sys
import tempfile

# A C++ log line: severity, date (0000 before absl::InitializeLog), time (or epoch seconds),
# thread, file:line].
_CPP_LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ [\w./+-]+:\d+\] ")
_SEVERITIES = "IWEF"
_DEFAULT_LEVEL = 2  # hide INFO and WARNING, as TF_CPP_MIN_LOG_LEVEL=2
# Errors TensorFlow logs on every machine without a usable CUDA driver: not errors of the run.
_NO_CUDA_ERRORS = ("failed call to cuInit", "Unable to register cu")
# Lines that are not C++ log lines but belong to hidden ones.
_STARTUP_NOTICES = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "To enable the following instructions:",  # second line of cpu_feature_guard's INFO
)
_OWN_DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def _cpp_log_level():
    """TF_CPP_MIN_LOG_LEVEL as an int; 2 when unset or not an integer."""
    try:
        return int(os.environ["TF_CPP_MIN_LOG_LEVEL"])
    except (KeyError, ValueError):
        return _DEFAULT_LEVEL


def is_startup_noise(line, level=_DEFAULT_LEVEL):
    """Whether a line of stderr is TensorFlow start-up noise to hide.

    Args:
      line: str, one line of stderr (with or without its newline).
      level: int, TF_CPP_MIN_LOG_LEVEL: C++ lines below it are hidden (0 INFO,
        1 WARNING, 2 ERROR, 3 FATAL); from 2 on also the errors every machine
        without a CUDA driver logs ("failed call to cuInit"): the device list
        the binaries print says whether a GPU is used.

    Returns:
      bool.
    """
    match = _CPP_LOG_LINE.match(line)
    if match:
        if _SEVERITIES.index(match.group(1)) < level:
            return True
        return level >= 2 and any(error in line for error in _NO_CUDA_ERRORS)
    return level >= 1 and line.startswith(_STARTUP_NOTICES)


@contextlib.contextmanager
def quiet_stderr():
    """Filters TensorFlow's C++ start-up lines out of fd 2 while the block runs.

    Everything the block writes to stderr is held in a temporary file and written
    back afterwards without the lines `is_startup_noise` hides (C++ code writes to
    the file descriptor, so sys.stderr alone cannot be redirected). With
    TF_CPP_MIN_LOG_LEVEL=0 nothing is filtered.
    """
    level = _cpp_log_level()
    if level <= 0:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode("utf-8", "replace").splitlines(keepends=True)
            kept = [line for line in lines if not is_startup_noise(line, level)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _ours_or_error(record):
    """Keeps records of cgc_tf itself and every record at ERROR or above."""
    return record.levelno >= logging.ERROR or record.pathname.startswith(_OWN_DIRECTORY)


def setup(verbose=False):
    """Quiets a binary's console; call first in its main(), after its flags are parsed.

    Hides other libraries' Python log records below ERROR (tfds's INFO lines,
    TensorFlow's deprecation and AutoGraph warnings, tf2onnx's INFO lines);
    cgc_tf's own records and every error stay.

    Args:
      verbose: bool, True when the user chose a verbosity (e.g. absl's
        --verbosity): then nothing is hidden.

    Returns:
      str: the visible devices by kind, e.g. "1 CPU" or "1 CPU, 2 GPU".
    """
    if not verbose:
        # On the loggers TensorFlow and absl log to, and on the handlers that print
        # (absl's on the root logger, TensorFlow's own): other libraries' loggers
        # (tf2onnx, ...) propagate to the root's.
        loggers = [logging.getLogger(name) for name in ("absl", "tensorflow")]
        handlers = logging.getLogger().handlers + logging.getLogger("tensorflow").handlers
        for target in loggers + handlers:
            if _ours_or_error not in target.filters:
                target.addFilter(_ours_or_error)
    return visible_devices()


def visible_devices():
    """The physical devices TensorFlow sees, by kind, e.g. "1 CPU, 2 GPU".

    Lists physical devices only, so the runtime stays unconfigured (strategies,
    logical devices) and the "failed call to cuInit" of CPU-only machines is hidden.
    """
    import tensorflow as tf  # noqa: PLC0415 (this module is imported before TensorFlow)

    with quiet_stderr():
        devices = tf.config.list_physical_devices()
    counts = collections.Counter(device.device_type for device in devices)
    return ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items()))


def prepare_binary(flag_values, module):
    """Call in a binary's entry point before `app.run`: help text and a quiet start.

    absl's --help prints the docstring of `__main__` and the key flags of
    sys.argv[0]; under a console script (`cgc-train`) `__main__` is the generated
    wrapper, which has neither, so `module`'s are registered for it (nothing
    changes when `module` runs as `__main__`, as in `python -m train.main`).
    TensorFlow's first device query then happens here, quietly: otherwise an
    absl after-init callback of TensorFlow's makes it inside `app.run` and logs
    "failed call to cuInit" on machines without CUDA.

    Args:
      flag_values: absl's `flags.FLAGS` (passed in: the library does not import
        absl.flags).
      module: the binary's module object, whose flags are its key flags.
    """
    main = sys.modules["__main__"]
    if main is not module:
        main.__doc__ = module.__doc__
        for flag in flag_values.get_key_flags_for_module(module.__name__):
            flag_values.register_key_flag_for_module(sys.argv[0], flag)
    visible_devices()
