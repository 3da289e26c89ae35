"""Subprocesses of the tests: their environment, and localhost clusters of workers."""

import contextlib
import json
import os
import socket

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_environment(**overrides):
    """The environment of a Python subprocess that imports this repository's packages.

    This process's environment with the TensorFlow Keras backend, quiet
    TensorFlow C++ logs and the repository first on PYTHONPATH (the packages are
    not installed), then `overrides`.

    Args:
      **overrides: environment variables (str values) set last.

    Returns:
      dict of str -> str, for `subprocess.run(..., env=...)`.
    """
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    environment["PYTHONPATH"] = os.pathsep.join(
        [REPO] + [path for path in environment.get("PYTHONPATH", "").split(os.pathsep) if path]
    )
    environment.update(overrides)
    return environment


def free_ports(count):
    """`count` ports the OS reports free now (bound to port 0, then released)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("localhost", 0))
        return [sock.getsockname()[1] for sock in sockets]


def worker_environment(ports, index, **overrides):
    """`subprocess_environment` of worker `index` of a cluster of workers on localhost.

    TF_CONFIG names one worker per port (MultiWorkerMirroredStrategy's
    cluster resolver reads it); no GPU is visible, so the workers use the CPU.

    Args:
      ports: list of int, one per worker (e.g. from `free_ports`).
      index: int, this worker's task index (0 is the chief).
      **overrides: further environment variables, set last.

    Returns:
      dict of str -> str.
    """
    tf_config = {
        "cluster": {"worker": [f"localhost:{port}" for port in ports]},
        "task": {"type": "worker", "index": index},
    }
    return subprocess_environment(
        TF_CONFIG=json.dumps(tf_config), CUDA_VISIBLE_DEVICES="", **overrides
    )
