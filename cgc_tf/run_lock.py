"""One training process per model_dir: an advisory lock held for the whole run.

Two processes on one model_dir (a run restarted while the previous process is
still exiting, or the same command launched twice) would interleave checkpoint,
log and metrics writes. The lock is `fcntl.flock` on `model_dir/.lock`: the
kernel releases it when the holder exits in any way, SIGKILL included, so a
stale lock file never blocks a restart. The file records the holder's PID for
the error message. flock is local to one machine; Python's standard library has
no cross-host lock, and cgc-tf's model_dir is a local path.
"""

import contextlib
import fcntl
import os

LOCK_FILE = ".lock"


class ModelDirInUseError(ValueError):
    """Another live process holds the model_dir lock."""


@contextlib.contextmanager
def hold(model_dir):
    """Holds the lock of `model_dir` (an existing directory) inside the `with` block.

    Raises:
      ModelDirInUseError: another process holds it; the message names its PID.
    """
    path = os.path.join(model_dir, LOCK_FILE)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ModelDirInUseError(
                f"model_dir={model_dir!r} is in use by another training process (PID "
                f"{holder}); wait for it to exit, or use another model_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        # Closing releases the lock.
        handle.close()
