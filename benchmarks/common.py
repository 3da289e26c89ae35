"""Shared helpers of the benchmarks: machine description, flag checks, timing, memory, output.

Every benchmark prints a human-readable table followed by one JSON object per
line (`emit_records`), so results can be read by eye and collected by tools
(`[json.loads(line) for line in output.splitlines() if line.startswith("{")]`).

Memory: `peak_rss_bytes` reads the kernel's resident-set high-water mark
(VmHWM in /proc/self/status; `resource.getrusage` where /proc is missing);
`reset_peak_rss` resets it (Linux >= 4.0, `/proc/self/clear_refs`) so a peak can
be measured after warm-up. Peaks of different configurations must come from
different processes (`run_probe`), or one configuration's peak hides another's.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import app

# Emitted by a probe subprocess in front of its JSON result, so the result is
# found among TensorFlow's log lines.
PROBE_PREFIX = "BENCHMARK_PROBE "


# ------------------------------------------------------------------ machine
def cpu_model():
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average():
    """(1, 5, 15)-minute load averages, or None where the OS has none."""
    try:
        return tuple(round(value, 2) for value in os.getloadavg())
    except OSError:
        return None


def host_description():
    """The host a benchmark ran on, whatever the framework: CPU, cores, Python, load.

    Returns:
      dict of JSON-serialisable values.
    """
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": load_average(),
    }


def machine_description():
    """Where a benchmark ran: `host_description` plus devices and library versions.

    Returns:
      dict of JSON-serialisable values.
    """
    import keras  # Imported here so that probes can set environment variables first.
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    description = host_description()
    description.update(
        devices=[device.name for device in tf.config.list_logical_devices()],
        accelerator=(
            [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
             for gpu in gpus]
            if gpus
            else None
        ),
        tensorflow=tf.__version__,
        keras=keras.__version__,
    )
    return description


def format_machine(description):
    """One line for the top of a benchmark's output."""
    accelerator = description["accelerator"] or "none (CPU only)"
    return (
        f"device: {accelerator}; CPU {description['cpu']} x{description['cores']} cores; "
        f"TensorFlow {description['tensorflow']}, Keras {description['keras']}; "
        f"load average {description['load_average']}"
    )


# -------------------------------------------------------------------- flags
def check_subsets(checks):
    """Raises `app.UsageError` unless every list flag is a non-empty subset of its choices.

    Args:
      checks: iterable of (flag name, list of values, allowed values).
    """
    for name, values, allowed in checks:
        if not values or set(values) - set(allowed):
            raise app.UsageError(f"--{name}={values} must be a non-empty subset of {list(allowed)}")


def check_minimums(checks):
    """Raises `app.UsageError` unless every numeric flag is at least its minimum.

    Args:
      checks: iterable of (flag name, value, minimum).
    """
    for name, value, minimum in checks:
        if value < minimum:
            raise app.UsageError(f"--{name}={value} must be >= {minimum}")


# ------------------------------------------------------------------- timing
def time_call(function):
    """Seconds (float) that `function()` takes; the function must block until done."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved_times(functions, warmup_steps, timed_steps):
    """Times several step functions in alternation, so load changes hit them all alike.

    Each function is first called `warmup_steps` times (tracing, compilation,
    allocator growth). Then come `timed_steps` rounds; every round calls each
    function once, in an order rotated by one position per round, so no function
    always runs right after the same neighbour.

    Both the wall-clock time and the CPU time of this process (all its threads,
    `time.process_time`) are recorded: on a machine shared with other jobs the
    wall-clock time of a step depends on their load, its CPU time much less.

    Args:
      functions: dict name -> callable that runs one step and blocks until done.
      warmup_steps: int >= 1.
      timed_steps: int >= 1.

    Returns:
      dict name -> {"wall": list of `timed_steps` floats (seconds), "cpu": same}.
    """
    if warmup_steps < 1 or timed_steps < 1:
        raise ValueError(
            f"warmup_steps={warmup_steps} and timed_steps={timed_steps} must both be >= 1"
        )
    names = list(functions)
    for name in names:
        for _ in range(warmup_steps):
            functions[name]()
    times = {name: {"wall": [], "cpu": []} for name in names}
    for round_index in range(timed_steps):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            cpu_start = time.process_time()
            times[name]["wall"].append(time_call(functions[name]))
            times[name]["cpu"].append(time.process_time() - cpu_start)
    return times


def summarize(times):
    """Wall-clock median, min and max, CPU-time median (seconds), the count, and the times.

    Args:
      times: one entry of `interleaved_times`: {"wall": [...], "cpu": [...]}.

    Returns:
      dict of floats median_s, min_s, max_s, cpu_median_s, int timed_steps, and the
      per-round wall_s and cpu_s lists (so a record's ratios can be recomputed).
    """
    wall = times["wall"]
    return {
        "median_s": float(statistics.median(wall)),
        "min_s": float(min(wall)),
        "max_s": float(max(wall)),
        "cpu_median_s": float(statistics.median(times["cpu"])),
        "timed_steps": len(wall),
        "wall_s": [float(value) for value in wall],
        "cpu_s": [float(value) for value in times["cpu"]],
    }


def paired_ratio(numerator, denominator):
    """Median of the per-round ratios numerator[i] / denominator[i].

    With interleaved timings, round i of two functions ran at about the same
    time, so the per-round ratio cancels most of the machine's load changes.
    """
    return float(np.median(np.asarray(numerator) / np.asarray(denominator)))


def ratios_to(times, reference_times, name):
    """Wall-clock and CPU-time `paired_ratio`s to a reference, as record fields.

    Args:
      times: one entry of `interleaved_times`: {"wall": [...], "cpu": [...]}.
      reference_times: the reference's entry of the same `interleaved_times` call.
      name: the reference's name in the field names, e.g. "plain".

    Returns:
      {f"ratio_to_{name}": float, f"cpu_ratio_to_{name}": float}.
    """
    return {
        f"ratio_to_{name}": paired_ratio(times["wall"], reference_times["wall"]),
        f"cpu_ratio_to_{name}": paired_ratio(times["cpu"], reference_times["cpu"]),
    }


# ------------------------------------------------------------------- memory
def _status_bytes(field):
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # The value is in kB.
    except OSError:
        pass
    return None


def current_rss_bytes():
    """Resident set size of this process now (bytes), or None if unknown."""
    return _status_bytes("VmRSS")


def peak_rss_bytes():
    """Resident-set high-water mark of this process (bytes) since start or the last reset."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss():
    """Resets the resident-set high-water mark to the current RSS (Linux >= 4.0).

    Returns:
      True on success, False where the kernel does not allow it.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def run_probe(module, argv, timeout=3600, env=None):
    """Runs `python -m module argv...` in a fresh process; returns its probe result.

    The child prints one line `PROBE_PREFIX + json`; its peaks are its own.

    Args:
      module: module name, e.g. "benchmarks.step_time".
      argv: list of command-line arguments.
      timeout: seconds.
      env: optional extra environment variables.

    Returns:
      The child's result dict.

    Raises:
      RuntimeError: if the child fails or prints no result (its stderr tail is shown).
    """
    environment = dict(os.environ)
    environment.update(env or {})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment["PYTHONPATH"] = os.pathsep.join(
        [root] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    completed = subprocess.run(
        [sys.executable, "-m", module] + list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=root,
    )
    for line in completed.stdout.splitlines():
        if line.startswith(PROBE_PREFIX):
            return json.loads(line[len(PROBE_PREFIX):])
    raise RuntimeError(
        f"probe `python -m {module} {' '.join(argv)}` exited with {completed.returncode} "
        f"and printed no result; stderr tail:\n{completed.stderr[-3000:]}"
    )


def print_probe_result(result):
    """Prints a probe's result for `run_probe` to read."""
    print(PROBE_PREFIX + json.dumps(result, sort_keys=True), flush=True)


# ------------------------------------------------------------------- output
def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_table(rows, columns):
    """A fixed-width text table.

    Args:
      rows: list of dicts.
      columns: list of (key, header) pairs; missing keys print "-".

    Returns:
      str, one line per row plus a header and a rule.
    """
    cells = [[header for _, header in columns]]
    cells += [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def emit_records(records, stream=None):
    """Prints each record as one JSON line (sorted keys)."""
    stream = stream or sys.stdout
    for record in records:
        stream.write(json.dumps(record, sort_keys=True) + "\n")
    stream.flush()


def print_report(header_lines, records, columns, rows=None):
    """Prints a benchmark's output: header lines, the table, one JSON line per record.

    Args:
      header_lines: list of str, e.g. [format_machine(description), the settings].
      records: list of dicts, printed as JSON lines (`emit_records`).
      columns: the table's columns (`format_table`).
      rows: the table's rows if not the records themselves (e.g. values formatted
        for reading).
    """
    for line in header_lines:
        print(line)
    print(format_table(records if rows is None else rows, columns))
    emit_records(records)


def mebibytes(value):
    """Bytes -> MiB (float), None stays None."""
    return None if value is None else value / 2**20


# ------------------------------------------------------------------- models
# Step variants: a plain classifier step and the CGC steps (see step_time.py).
STEP_VARIANTS = ("plain", "cgc3", "cgc2")
# step_time's also: "baseline", `CGCModel(consistency="none")`, the plain baseline
# method as cgc-train runs it, beside the ordinary Keras classifier "plain".
CGC_MODEL_STEP_VARIANTS = ("plain", "baseline", "cgc3", "cgc2")

# Table columns of step times compared with the plain step's (`summarize`, the
# plain median and `ratios_to(..., "plain")`): step_time's and reference_torch's,
# so that the two tables read side by side.
PLAIN_COMPARISON_COLUMNS = [
    ("median_s", "median s"),
    ("min_s", "min s"),
    ("max_s", "max s"),
    ("plain_median_s", "plain s"),
    ("ratio_to_plain", "x plain"),
    ("cpu_median_s", "CPU s"),
    ("cpu_ratio_to_plain", "CPU x plain"),
]


def jit_value(setting):
    """"false" | "true" | "auto" -> the value of Keras's `compile(jit_compile=...)`."""
    values = {"false": False, "true": True, "auto": "auto"}
    if setting not in values:
        raise ValueError(f"jit_compile={setting!r} must be one of {sorted(values)}")
    return values[setting]


def build_step_model(variant, arch, image_size, num_classes, jit_compile, learning_rate, seed):
    """A compiled model for one step variant (call inside the strategy scope).

    Args:
      variant: "plain" (the backbone as a Keras classifier with sparse
        cross-entropy from logits), "baseline" (`CGCModel(consistency="none")`,
        one view and one cross-entropy as "plain"), "cgc3" (`CGCModel(views=3)`)
        or "cgc2" (`CGCModel(views=2)`).
      arch: a `cgc_tf.backbones.BUILDERS` name.
      image_size: int S.
      num_classes: int K.
      jit_compile: "false", "true" or "auto".
      learning_rate: SGD learning rate (momentum 0.9, weight decay 1e-4).
      seed: weight initialisation seed.

    Returns:
      The compiled keras.Model.
    """
    import keras

    import cgc_tf
    from cgc_tf import backbones

    if variant not in CGC_MODEL_STEP_VARIANTS:
        raise ValueError(f"variant={variant!r} must be one of {CGC_MODEL_STEP_VARIANTS}")
    keras.utils.set_random_seed(seed)
    backbone, target_layer = backbones.build(arch, (image_size, image_size, 3), num_classes)
    optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9, weight_decay=1e-4)
    if variant == "plain":
        backbone.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_value(jit_compile),
        )
        return backbone
    if variant == "baseline":
        # views=3: trains on the batch's classification view, as "plain" does.
        model = cgc_tf.CGCModel(backbone, target_layer=target_layer, consistency="none", views=3)
    else:
        model = cgc_tf.CGCModel(backbone, target_layer=target_layer, views=int(variant[3]))
    model.compile(optimizer=optimizer, jit_compile=jit_value(jit_compile))
    return model


def random_batch(batch_size, image_size, num_classes, seed):
    """A seeded training batch.

    Returns:
      ({"image", "classification_view"}: float32 [B, S, S, 3] in [0, 1],
      labels int32 [B]).
    """
    rng = np.random.default_rng(seed)
    shape = (batch_size, image_size, image_size, 3)
    views = {
        "image": rng.random(shape, dtype=np.float32),
        "classification_view": rng.random(shape, dtype=np.float32),
    }
    labels = rng.integers(0, num_classes, size=batch_size).astype(np.int32)
    return views, labels


def make_train_step(model, variant, batch, strategy=None):
    """A callable running one optimizer step of `model` on `batch`; blocks until done.

    The step calls `model.train_function` on a (distributed) dataset iterator, as
    `fit` does; the plain classifier gets the classification view only. Building
    the model, its optimizer and metrics happens here, in one untimed
    `train_on_batch` on a replica-sized slice.

    Args:
      model: from `build_step_model`.
      variant: its variant name.
      batch: from `random_batch`, the global batch.
      strategy: the tf.distribute strategy the model was built under (None:
        the default strategy).

    Returns:
      callable () -> dict of float logs.
    """
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    views, labels = batch
    features = views["classification_view"] if variant == "plain" else views
    replica_batch = len(labels) // strategy.num_replicas_in_sync
    model.train_on_batch(
        tf.nest.map_structure(lambda t: t[:replica_batch], features), labels[:replica_batch]
    )
    dataset = tf.data.Dataset.from_tensors((features, labels)).repeat()
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    model.make_train_function()

    def step():
        logs = model.train_function(iterator)
        # Reading the values waits for the step (and, under a strategy, all replicas).
        return {name: float(value) for name, value in logs.items()}

    return step
