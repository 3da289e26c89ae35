"""Images each worker decodes, for 1, 2, ... localhost workers of `cgc-train --strategy=multi_worker`.

  python -m benchmarks.multi_worker_input --workers=1,2,3
  python -m benchmarks.multi_worker_input --workers=2 -- --dataset=folder:/data/imgs

For each worker count N it starts N `python -m train.main --strategy=multi_worker`
processes on localhost (TF_CONFIG with N free ports, no GPU), each training one
short epoch in a fresh model_dir, and reads the `input_stats/worker-<i>.json`
files they wrote (`cgc_tf.data.InputStats`). The table compares every worker's
`images_decoded` with `total / N`, where total is the training split's size: the
input work of one worker that reads everything. Extra arguments after `--` are
passed to every worker (they override the defaults below).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

from benchmarks import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small, fast defaults: the embedded dataset at 16x16, one training step.
DEFAULT_FLAGS = (
    "--image_size=16",
    "--batch_size=6",  # divisible by 1, 2 and 3 workers
    "--steps_per_epoch=1",
    "--epochs=1",
    "--warmup_epochs=0",
    "--noexport",
)

_WORKERS = flags.DEFINE_list("workers", ["1", "2", "3"], "Worker counts to run, e.g. 1,2,3.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "tfds data_dir shared by the workers (default: a temporary one)."
)
_TIMEOUT = flags.DEFINE_integer("timeout", 600, "Seconds one launch may take.")


def _worker_environment(ports, index):
    tf_config = {
        "cluster": {"worker": [f"localhost:{port}" for port in ports]},
        "task": {"type": "worker", "index": index},
    }
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    environment.update(TF_CONFIG=json.dumps(tf_config), CUDA_VISIBLE_DEVICES="")
    environment["PYTHONPATH"] = os.pathsep.join(
        [REPO] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return environment


def _free_ports(count):
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("localhost", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def run_workers(num_workers, model_dir, data_dir, extra_flags=(), timeout=600):
    """Trains with `num_workers` localhost workers; returns their input stats.

    Args:
      num_workers: int >= 1.
      model_dir: str, the run's model_dir (shared by the workers).
      data_dir: str, the tfds data_dir (the chief prepares the embedded dataset).
      extra_flags: further cgc-train flags for every worker (after the defaults).
      timeout: seconds the launch may take.

    Returns:
      list of dicts, the `input_stats/worker-<i>.json` of workers 0..N-1.

    Raises:
      RuntimeError: a worker failed or timed out (its log tail in the message).
    """
    ports = _free_ports(num_workers)
    command = [
        sys.executable, "-m", "train.main", "--strategy=multi_worker",
        f"--model_dir={model_dir}", f"--data_dir={data_dir}", *DEFAULT_FLAGS, *extra_flags,
    ]
    os.makedirs(model_dir, exist_ok=True)
    processes, logs = [], []
    for index in range(num_workers):
        log_path = os.path.join(model_dir, f"worker_{index}.log")
        logs.append(log_path)
        with open(log_path, "w") as log:
            processes.append(subprocess.Popen(
                command, cwd=REPO, env=_worker_environment(ports, index), stdout=log,
                stderr=subprocess.STDOUT,
            ))
    failures = []
    try:
        for index, process in enumerate(processes):
            try:
                if process.wait(timeout=timeout) != 0:
                    failures.append(index)
            except subprocess.TimeoutExpired:
                failures.append(index)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    if failures:
        with open(logs[failures[0]]) as log:
            tail = log.read()[-3000:]
        raise RuntimeError(f"{num_workers} workers: worker(s) {failures} failed; log:\n{tail}")
    stats = []
    for index in range(num_workers):
        with open(os.path.join(model_dir, "input_stats", f"worker-{index}.json")) as file:
            stats.append(json.load(file))
    return stats


def main(argv):
    extra_flags = argv[1:]
    data_dir = _DATA_DIR.value or tempfile.mkdtemp(prefix="cgc_tf_input_benchmark_data_")
    root = tempfile.mkdtemp(prefix="cgc_tf_input_benchmark_")
    records = []
    try:
        for count in [int(value) for value in _WORKERS.value]:
            stats = run_workers(
                count, os.path.join(root, f"workers_{count}"), data_dir, extra_flags,
                _TIMEOUT.value,
            )
            total = sum(worker["examples_per_epoch"] for worker in stats)
            for index, worker in enumerate(stats):
                records.append(dict(
                    worker, workers=count, worker=index, total_examples=total,
                    share=round(total / count, 1),
                    decoded_over_share=round(worker["images_decoded"] / (total / count), 4),
                ))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    columns = [
        ("workers", "workers"), ("worker", "worker"), ("examples_per_epoch", "examples/epoch"),
        ("images_decoded", "images decoded"), ("share", "total / N"),
        ("decoded_over_share", "decoded / (total / N)"),
    ]
    common.print_report([common.format_machine(common.machine_description())], records, columns)


if __name__ == "__main__":
    app.run(main)
