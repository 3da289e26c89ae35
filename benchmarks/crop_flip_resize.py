"""Speed of `cgc_tf.resample.crop_flip_resize` against the dense formulation it replaced.

  python -m benchmarks.crop_flip_resize --batch_size=16 --image_size=224 --jit_compile=false,true

`crop_flip_resize` is T (crop, bilinear resize, flip) in every CGC step: once on
the images (x_aug = T(x_orig)) and once, differentiated, on the heatmaps (the
warp of cam(x_orig)). Methods (`--methods`):
  gather  the library's op: two bilinear taps per output row, then per output
          column, by batched gathers (O(output pixels));
  dense   the formulation cgc_tf used before (`benchmarks.dense_resize`):
          per-example interpolation matrices [B, out, in] built from one-hot
          rows, applied with two einsums (O(output pixels x input side)); kept
          to justify the choice, e.g. on an accelerator where dense
          contractions beat gathers.
Workloads: `images`, the forward op on float32 [B, S, S, 3]; `heatmaps`, forward
and gradient on float32 [B, S, S, 1] (what the CGC loss differentiates). Every
method x workload x `--jit_compile` setting is a tf.function built in this one
process, timed interleaved (`common.interleaved_times`); "x gather" is the median
of per-round ratios to the gather method of the same workload and XLA setting,
and "max |diff|" the largest difference from the uncompiled gather output.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

METHODS = ("gather", "dense")
WORKLOADS = ("images", "heatmaps")
JIT_SETTINGS = ("false", "true")

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Batch size B (>= 1).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input and output side S in pixels (>= 2).")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"A subset of {list(METHODS)}.")
_JIT_COMPILE = flags.DEFINE_list(
    "jit_compile", ["false", "true"], f"XLA settings, a subset of {list(JIT_SETTINGS)}."
)
_WARMUP_CALLS = flags.DEFINE_integer("warmup_calls", 2, "Untimed calls per function (>= 1).")
_TIMED_CALLS = flags.DEFINE_integer("timed_calls", 15, "Timed calls per function (>= 1).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the inputs and of the transforms.")


def _check_flags():
    common.check_subsets(
        (("methods", _METHODS.value, METHODS), ("jit_compile", _JIT_COMPILE.value, JIT_SETTINGS))
    )
    common.check_minimums(
        (
            ("batch_size", _BATCH_SIZE.value, 1),
            ("image_size", _IMAGE_SIZE.value, 2),
            ("warmup_calls", _WARMUP_CALLS.value, 1),
            ("timed_calls", _TIMED_CALLS.value, 1),
        )
    )


def _functions(batch_size, image_size, seed):
    """{(method, jit, workload): (tf.function, input)} and the transform they share."""
    import tensorflow as tf

    from benchmarks import dense_resize
    from cgc_tf import augment
    from cgc_tf import resample

    implementations = {"gather": resample.crop_flip_resize, "dense": dense_resize.crop_flip_resize}
    transform = augment.PairedAugmentation(seed=seed).sample(batch_size, image_size, image_size)
    boxes, flips = transform["boxes"], transform["flips"]
    size = (image_size, image_size)
    inputs = {
        "images": tf.random.stateless_uniform(
            [batch_size, image_size, image_size, 3], seed=[seed, 1]
        ),
        "heatmaps": tf.random.stateless_uniform(
            [batch_size, image_size, image_size, 1], seed=[seed, 2]
        ),
    }
    functions = {}
    for jit in _JIT_COMPILE.value:
        for method in _METHODS.value:
            implementation = implementations[method]

            def forward(images, implementation=implementation):
                return implementation(images, boxes, flips, size)

            def forward_and_gradient(heatmaps, implementation=implementation):
                with tf.GradientTape() as tape:
                    tape.watch(heatmaps)
                    warped = implementation(heatmaps, boxes, flips, size)
                    loss = tf.reduce_sum(warped * warped)
                return tape.gradient(loss, heatmaps)

            for workload, function in (("images", forward), ("heatmaps", forward_and_gradient)):
                compiled = tf.function(function, jit_compile=jit == "true")
                functions[(method, jit, workload)] = (compiled, inputs[workload])
    return functions


def run():
    """Times every configuration; returns (machine description, records)."""
    import numpy as np

    description = common.machine_description()
    functions = _functions(_BATCH_SIZE.value, _IMAGE_SIZE.value, _SEED.value)
    outputs = {key: function(value).numpy() for key, (function, value) in functions.items()}
    steps = {
        key: (lambda function=function, value=value: function(value).numpy())
        for key, (function, value) in functions.items()
    }
    times = common.interleaved_times(steps, _WARMUP_CALLS.value, _TIMED_CALLS.value)
    description["load_average_after"] = common.load_average()
    records = []
    for method, jit, workload in functions:
        key = (method, jit, workload)
        record = {
            "benchmark": "crop_flip_resize",
            "method": method,
            "jit_compile": jit,
            "workload": workload,
            "batch_size": _BATCH_SIZE.value,
            "image_size": _IMAGE_SIZE.value,
            "machine": description,
        }
        summary = common.summarize(times[key])
        for name in ("median", "min", "max", "cpu_median"):
            record[f"{name}_ms"] = 1000.0 * summary[f"{name}_s"]
        record["timed_calls"] = summary["timed_steps"]
        reference = ("gather", "false", workload)
        if reference in outputs:
            record["max_abs_difference"] = float(np.max(np.abs(outputs[key] - outputs[reference])))
        baseline = ("gather", jit, workload)
        if baseline in times:
            record.update(common.ratios_to(times[key], times[baseline], "gather"))
        records.append(record)
    records.sort(
        key=lambda r: (WORKLOADS.index(r["workload"]), r["jit_compile"], r["method"] != "gather")
    )
    return description, records


COLUMNS = [
    ("workload", "workload"),
    ("method", "method"),
    ("jit_compile", "jit"),
    ("median_ms", "median ms"),
    ("min_ms", "min ms"),
    ("max_ms", "max ms"),
    ("ratio_to_gather", "x gather"),
    ("cpu_median_ms", "CPU ms"),
    ("cpu_ratio_to_gather", "CPU x gather"),
    ("max_abs_difference", "max |diff|"),
]


def main(argv):
    del argv  # Unused.
    _check_flags()
    description, records = run()
    settings = (
        f"crop_flip_resize [{_BATCH_SIZE.value}, {_IMAGE_SIZE.value}, {_IMAGE_SIZE.value}, C]; "
        "images: forward, C=3; heatmaps: forward + gradient, C=1; "
        f"{_WARMUP_CALLS.value} warm-up + {_TIMED_CALLS.value} timed calls, interleaved; "
        "x gather = median of per-round ratios to the gather method (same workload and jit)"
    )
    # Differences are float rounding (~1e-7 to 1e-4): scientific notation in the table.
    rows = [
        dict(record, max_abs_difference=f"{record['max_abs_difference']:.1e}")
        if "max_abs_difference" in record
        else record
        for record in records
    ]
    common.print_report([common.format_machine(description), settings], records, COLUMNS, rows)


if __name__ == "__main__":
    app.run(main)
