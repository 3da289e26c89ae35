"""Seconds per optimizer step and peak memory: a plain classifier step vs the CGC step.

  python -m benchmarks.step_time --arch=resnet18 --image_size=224 --batch_size=16
  python -m benchmarks.step_time --arch=resnet50 --batch_size=8 --jit_compile=false,true
  python -m benchmarks.step_time --arch=small_resnet --image_size=48 --dtype_policy=mixed_bfloat16
  python -m benchmarks.step_time --dtype_policy=float32,auto --variants=plain,cgc3
  python -m benchmarks.step_time --dtype_policy=float32,auto --variants=plain,cgc3 \
      --torch_reference=reference --memory=none

Variants (`--variants`), all with the same backbone architecture, batch, image
size and SGD optimizer:
  plain     the backbone compiled as an ordinary Keras classifier (sparse
            cross-entropy from logits), one view: the cost CGC is compared with;
  baseline  `CGCModel(consistency="none")`, the plain baseline method of
            cgc-train (the reference's baseline_train_eval.py): the same one
            view and one cross-entropy, so its "x plain" should be ~1;
  cgc3      `CGCModel(views=3)`, METHOD.md's step (CE on x_xe, x_orig, x_aug +
            Grad-CAM consistency);
  cgc2      `CGCModel(views=2)`, the faster variant without the x_xe view.
Every variant x `--jit_compile` x `--dtype_policy` setting is built in this one
process (a layer keeps the dtype policy it was built under) and the timed steps
are interleaved; "auto" is cgc-train's `--mixed_precision=auto`
(`cgc_tf.distribute.resolve_mixed_precision`: bfloat16 where the device computes it
natively), and with float32 among the policies each row also gets its ratio to
the float32 step of the same variant ("x f32"). The timed steps are interleaved (`common.interleaved_times`), so the CGC / plain
ratio (the median of the per-round ratios) holds up on a loaded machine.

`--torch_reference` adds the PyTorch step of each variant that has one
(`benchmarks.torch_steps`: "reference" is the published code's model, plain and
cgc3; "transcription" the step transcribed there, plain, cgc3 and cgc2; both
ResNet-18/50, SGD as ours) to the same interleaved rounds, once per dtype
policy: float32 as is, a bfloat16 (float16) policy under
`torch.autocast(device_type="cpu", dtype=torch.bfloat16 (float16))`. Its rows
(framework "torch") come after ours, and each of our rows gets its ratio to the
torch step of the same variant and policy ("x torch", median of the per-round
ratios). A torch step that cannot run (the reference's CGC step under bfloat16
autocast calls numpy on a bfloat16 tensor) is reported with its error.

Peak memory (`--memory=subprocess`) is measured per variant in a fresh process
(so peaks do not mix), over `--memory_steps` steps after `--warmup_steps`
(statistics reset after warm-up):
  * "peak MiB": TensorFlow's allocator peak (`tf.config.experimental.
    get_memory_info`) of the device: the GPU's, or on CPU the host allocator's,
    which the probe switches to the BFC allocator (TF_CPU_ALLOCATOR_USE_BFC=true)
    because only that one keeps statistics. It counts tensors (weights,
    optimizer slots, activations kept for the backward pass, workspaces), not
    the runtime, the Python heap or the traced graphs;
  * "step MiB": that peak minus the allocator's use before those steps
    (weights, optimizer slots, the input batch): what one step adds;
  * "peak RSS MiB": the process's resident-set high-water mark (VmHWM) over
    the same steps, everything included (TensorFlow itself, the traced graphs
    and the allocator's pooled free memory too).
The allocator peak depends on the order in which the executor runs independent
ops, so it varies from run to run (by ~15% for ResNet-18 on 2 cores).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import torch_steps  # noqa: E402

VARIANTS = common.CGC_MODEL_STEP_VARIANTS
ARCHS = ("small_resnet", "resnet18", "resnet34", "resnet50")
JIT_SETTINGS = ("false", "true", "auto")
DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16", "auto")

_ARCH = flags.DEFINE_enum("arch", "resnet18", ARCHS, "Backbone (cgc_tf.backbones.build).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input side S in pixels (>= 8).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 16, "Global batch size (>= 1), split evenly over --replicas."
)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Number of classes (>= 2).")
_VARIANTS = flags.DEFINE_list(
    "variants", list(VARIANTS), f"Steps to time, a subset of {list(VARIANTS)}."
)
_JIT_COMPILE = flags.DEFINE_list(
    "jit_compile",
    ["false"],
    f"XLA settings to time, a subset of {list(JIT_SETTINGS)} (each variant once per setting).",
)
_DTYPE_POLICY = flags.DEFINE_list(
    "dtype_policy",
    ["float32"],
    f"Keras dtype policies to time, a subset of {list(DTYPE_POLICIES)} (auto: as "
    "cgc-train --mixed_precision=auto).",
)
_REPLICAS = flags.DEFINE_integer(
    "replicas",
    1,
    "Strategy replicas (>= 1): MirroredStrategy over this many GPUs, or over as many logical "
    "CPU devices carved from the CPU on a machine without GPUs.",
)
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 2, "Untimed steps per variant (>= 1).")
_TIMED_STEPS = flags.DEFINE_integer("timed_steps", 5, "Timed steps per variant (>= 1).")
_MEMORY = flags.DEFINE_enum(
    "memory",
    "subprocess",
    ("subprocess", "none"),
    "Peak memory: measured in one fresh process per variant, or not measured.",
)
_MEMORY_STEPS = flags.DEFINE_integer(
    "memory_steps", 2, "Steps measured by each memory probe, after --warmup_steps (>= 1)."
)
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", 0.01, "SGD learning rate (momentum 0.9, weight decay 1e-4) of every variant."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the random batch.")
_TORCH_REFERENCE = flags.DEFINE_enum(
    "torch_reference",
    "none",
    ("none", *torch_steps.MODEL_CODES),
    "Also time the PyTorch step of each variant, interleaved with ours (benchmarks."
    "torch_steps: the reference's own model code or the transcription); needs torch.",
)
_REFERENCE_DIR = flags.DEFINE_string(
    "reference_dir",
    torch_steps.DEFAULT_REFERENCE_DIR,
    "The reference repository (models/resnet_multigpu_cgc.py), for --torch_reference=reference.",
)
_THREADS = flags.DEFINE_integer(
    "threads",
    None,
    "Intra-op threads of TensorFlow and of torch (>= 1; default: each framework's own, one "
    "per core). One thread per framework keeps a loaded machine's scheduling out of the "
    "comparison: torch's OpenMP threads spin-wait for each other at every barrier.",
)
_PROBE = flags.DEFINE_string(
    "probe", None, "Internal: measure the memory of one 'variant:jit' in this process and exit."
)


def _check_flags():
    common.check_subsets(
        (
            ("variants", _VARIANTS.value, VARIANTS),
            ("jit_compile", _JIT_COMPILE.value, JIT_SETTINGS),
            ("dtype_policy", _DTYPE_POLICY.value, DTYPE_POLICIES),
        )
    )
    common.check_minimums(
        (
            ("image_size", _IMAGE_SIZE.value, 8),
            ("batch_size", _BATCH_SIZE.value, 1),
            ("num_classes", _NUM_CLASSES.value, 2),
            ("replicas", _REPLICAS.value, 1),
            ("warmup_steps", _WARMUP_STEPS.value, 1),
            ("timed_steps", _TIMED_STEPS.value, 1),
            ("memory_steps", _MEMORY_STEPS.value, 1),
            ("threads", _THREADS.value or 1, 1),
        )
    )
    if _TORCH_REFERENCE.value != "none":
        if _ARCH.value not in torch_steps.ARCHS:
            raise app.UsageError(
                f"--torch_reference needs --arch in {list(torch_steps.ARCHS)}, not {_ARCH.value!r}"
            )
        if _REPLICAS.value != 1:
            raise app.UsageError("--torch_reference times one device: --replicas must be 1")
        if _BATCH_SIZE.value < 2:
            raise app.UsageError("--torch_reference needs --batch_size >= 2 (InfoNCE negatives)")
    if _BATCH_SIZE.value % _REPLICAS.value:
        raise app.UsageError(
            f"--batch_size={_BATCH_SIZE.value} must be a multiple of --replicas={_REPLICAS.value}"
        )


def _configure_devices(replicas):
    """Carves `replicas` logical CPU devices when there is no GPU (before TF starts)."""
    import tensorflow as tf

    if _THREADS.value:
        tf.config.threading.set_intra_op_parallelism_threads(_THREADS.value)
    if replicas > 1 and not tf.config.list_physical_devices("GPU"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
        )


def _strategy(replicas):
    """The default strategy for one replica, else MirroredStrategy over `replicas` devices."""
    import tensorflow as tf

    if replicas == 1:
        return tf.distribute.get_strategy()
    # cgc_tf.distribute.strategy_from_name("mirrored") takes every GPU; the benchmark
    # needs exactly `replicas` devices, so it names them.
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if len(devices) < replicas:
        raise app.UsageError(
            f"--replicas={replicas} but only {len(devices)} devices: {[d.name for d in devices]}"
        )
    return tf.distribute.MirroredStrategy([device.name for device in devices[:replicas]])


def _resolved_policy(policy):
    """A Keras dtype policy name; "auto" as cgc-train resolves it on this machine."""
    if policy != "auto":
        return policy
    from cgc_tf import distribute

    return distribute.resolve_mixed_precision("auto", "default")[0]


def _build(variant, jit, policy):
    import keras

    keras.mixed_precision.set_dtype_policy(_resolved_policy(policy))
    try:
        return common.build_step_model(
            variant,
            _ARCH.value,
            _IMAGE_SIZE.value,
            _NUM_CLASSES.value,
            jit,
            _LEARNING_RATE.value,
            _SEED.value,
        )
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def _batch():
    return common.random_batch(
        _BATCH_SIZE.value, _IMAGE_SIZE.value, _NUM_CLASSES.value, _SEED.value
    )


def _configurations():
    return [
        (variant, jit, policy)
        for policy in _DTYPE_POLICY.value
        for jit in _JIT_COMPILE.value
        for variant in _VARIANTS.value
    ]


def _description(variant, jit, policy):
    return {
        "benchmark": "step_time",
        "variant": variant,
        "views": 1 if variant in ("plain", "baseline") else int(variant[3]),
        "arch": _ARCH.value,
        "image_size": _IMAGE_SIZE.value,
        "batch_size": _BATCH_SIZE.value,
        "num_classes": _NUM_CLASSES.value,
        "jit_compile": jit,
        "dtype_policy": policy,
        "keras_dtype_policy": _resolved_policy(policy),
        "replicas": _REPLICAS.value,
        "threads": _THREADS.value,
    }


# Keras dtype policy -> the torch.autocast dtype of the torch step paired with it.
_TORCH_AUTOCAST = {"float32": "none", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def _torch_configurations():
    """("torch", variant, policy) for each requested variant the torch step has."""
    if _TORCH_REFERENCE.value == "none":
        return []
    variants = torch_steps.MODEL_CODE_VARIANTS[_TORCH_REFERENCE.value]
    return [
        ("torch", variant, policy)
        for policy in _DTYPE_POLICY.value
        for variant in _VARIANTS.value
        if variant in variants
    ]


def _torch_steps():
    """({configuration: step} of the torch steps that run, {configuration: error message})."""
    import torch

    if _THREADS.value:
        torch.set_num_threads(_THREADS.value)
    batch = torch_steps.random_batch(
        _BATCH_SIZE.value, _IMAGE_SIZE.value, _NUM_CLASSES.value, _SEED.value
    )
    steps, errors = {}, {}
    for configuration in _torch_configurations():
        _, variant, policy = configuration
        step = torch_steps.make_step(
            _TORCH_REFERENCE.value, variant, _ARCH.value, _NUM_CLASSES.value, batch, _SEED.value,
            autocast=_TORCH_AUTOCAST[_resolved_policy(policy)],
            reference_dir=_REFERENCE_DIR.value,
        )
        try:
            step()  # one untimed step: a step that cannot run is reported, not timed
        except Exception as error:  # noqa: BLE001  (any failure is the row's result)
            errors[configuration] = f"{type(error).__name__}: {error}"
            continue
        steps[configuration] = step
    return steps, errors, {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def _torch_record(configuration, times, errors):
    """The row of a torch step: its times, ratios to its plain and float32 steps, or its error."""
    _, variant, policy = configuration
    record = _description(variant, "false", policy)
    del record["jit_compile"], record["replicas"]
    record.update(
        framework="torch",
        torch_model_code=_TORCH_REFERENCE.value,
        autocast=_TORCH_AUTOCAST[record["keras_dtype_policy"]],
    )
    if configuration in errors:
        record["error"] = errors[configuration]
        return record
    record.update(common.summarize(times[configuration]))
    record["images_per_s"] = _BATCH_SIZE.value / record["median_s"]
    plain = ("torch", "plain", policy)
    if plain in times:
        record["plain_median_s"] = common.summarize(times[plain])["median_s"]
        record.update(common.ratios_to(times[configuration], times[plain], "plain"))
    if ("torch", variant, "float32") in times:
        record.update(
            common.ratios_to(times[configuration], times[("torch", variant, "float32")], "float32")
        )
    record["device"] = "CPU"
    return record


def _probe_memory(variant, jit, policy):
    """Child process: memory of `variant` with XLA setting `jit`; prints the probe result."""
    import tensorflow as tf

    strategy = _strategy(_REPLICAS.value)
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")[:1]
    batch = _batch()
    with strategy.scope():
        model = _build(variant, jit, policy)
    step = common.make_train_step(model, variant, batch, strategy)
    for _ in range(_WARMUP_STEPS.value):
        step()

    def allocator(key):
        return sum(tf.config.experimental.get_memory_info(d.name)[key] for d in devices)

    # The parent checks that the probe measured the configuration it asked for.
    result = {
        "configuration": _description(variant, jit, policy),
        "allocator_before_steps": allocator("current"),
    }
    for device in devices:
        tf.config.experimental.reset_memory_stats(device.name)
    reset = common.reset_peak_rss()
    for _ in range(_MEMORY_STEPS.value):
        step()
    result["allocator_peak"] = allocator("peak")
    result["peak_rss"] = common.peak_rss_bytes() if reset else None
    common.print_probe_result(result)


def _probe_flags(variant, jit, policy):
    """The command line of the memory probe of `variant` with XLA setting `jit`.

    Built from this run's flag values: absl passes `main` only the positional
    arguments, so the flags must not be taken from its `argv`.
    """
    return [
        f"--arch={_ARCH.value}",
        f"--image_size={_IMAGE_SIZE.value}",
        f"--batch_size={_BATCH_SIZE.value}",
        f"--num_classes={_NUM_CLASSES.value}",
        f"--dtype_policy={policy}",
        f"--replicas={_REPLICAS.value}",
        f"--warmup_steps={_WARMUP_STEPS.value}",
        f"--memory_steps={_MEMORY_STEPS.value}",
        f"--learning_rate={_LEARNING_RATE.value!r}",
        f"--seed={_SEED.value}",
        *([f"--threads={_THREADS.value}"] if _THREADS.value else []),
        f"--probe={variant}:{jit}",
    ]


def _memory_of(variant, jit, policy):
    """Runs `_probe_memory` in a fresh process; returns the memory fields of a record."""
    # Only the BFC allocator keeps the statistics get_memory_info reads on CPU.
    probe = common.run_probe(
        "benchmarks.step_time",
        _probe_flags(variant, jit, policy),
        env={"TF_CPU_ALLOCATOR_USE_BFC": "true"},
    )
    if probe.get("configuration") != _description(variant, jit, policy):
        raise RuntimeError(
            f"the memory probe measured {probe.get('configuration')}, not the requested "
            f"{_description(variant, jit, policy)}"
        )
    peak = common.mebibytes(probe["allocator_peak"])
    return {
        "peak_mib": peak,
        "step_mib": peak - common.mebibytes(probe["allocator_before_steps"]),
        "peak_rss_mib": common.mebibytes(probe["peak_rss"]),
    }


def run():
    """Times every configuration; returns (machine description, records)."""
    import tensorflow as tf

    strategy = _strategy(_REPLICAS.value)
    description = common.machine_description()
    batch = _batch()
    steps = {}
    with strategy.scope():
        for configuration in _configurations():
            variant, jit, policy = configuration
            model = _build(variant, jit, policy)
            steps[configuration] = common.make_train_step(model, variant, batch, strategy)
            # "auto" resolves inside compile; record what it chose.
            steps[configuration].resolved_jit = bool(model.jit_compile)
    resolved_jit = {configuration: step.resolved_jit for configuration, step in steps.items()}
    torch_errors = {}
    if _torch_configurations():
        torch_step_functions, torch_errors, torch_description = _torch_steps()
        steps.update(torch_step_functions)
        description.update(torch_description)
    times = common.interleaved_times(steps, _WARMUP_STEPS.value, _TIMED_STEPS.value)
    description["load_average_after"] = common.load_average()
    records = []
    for configuration in _configurations():
        variant, jit, policy = configuration
        record = _description(variant, jit, policy)
        record["framework"] = "tensorflow"
        record.update(common.summarize(times[configuration]))
        record["xla"] = resolved_jit[configuration]
        record["images_per_s"] = _BATCH_SIZE.value / record["median_s"]
        if ("plain", jit, policy) in times:
            plain_times = times[("plain", jit, policy)]
            record["plain_median_s"] = common.summarize(plain_times)["median_s"]
            record.update(common.ratios_to(times[configuration], plain_times, "plain"))
        if (variant, jit, "float32") in times:
            record.update(
                common.ratios_to(times[configuration], times[(variant, jit, "float32")], "float32")
            )
        if ("torch", variant, policy) in times:
            record.update(
                common.ratios_to(times[configuration], times[("torch", variant, policy)], "torch")
            )
        record["device"] = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        records.append(record)
    if _MEMORY.value == "subprocess":
        for record in records:
            record.update(
                _memory_of(record["variant"], record["jit_compile"], record["dtype_policy"])
            )
        plain = {
            (r["jit_compile"], r["dtype_policy"]): r for r in records if r["variant"] == "plain"
        }
        for record in records:
            reference = plain.get((record["jit_compile"], record["dtype_policy"]))
            if reference is not None:
                record["peak_ratio"] = record["peak_mib"] / reference["peak_mib"]
                record["step_memory_ratio"] = record["step_mib"] / reference["step_mib"]
    records += [_torch_record(c, times, torch_errors) for c in _torch_configurations()]
    for record in records:
        record["machine"] = description
    return description, records


COLUMNS = [
    ("framework", "framework"),
    ("variant", "variant"),
    ("jit_compile", "jit"),
    ("keras_dtype_policy", "policy"),
    ("autocast", "torch autocast"),
    *common.PLAIN_COMPARISON_COLUMNS,
    ("ratio_to_float32", "x f32"),
    ("ratio_to_torch", "x torch"),
    ("cpu_ratio_to_torch", "CPU x torch"),
    ("images_per_s", "img/s"),
    ("peak_mib", "peak MiB"),
    ("peak_ratio", "peak x plain"),
    ("step_mib", "step MiB"),
    ("step_memory_ratio", "step x plain"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("error", "error"),
]


def main(argv):
    del argv  # Unused: everything comes in through flags.
    _check_flags()
    _configure_devices(_REPLICAS.value)
    if _PROBE.value:
        variant, _, jit = _PROBE.value.partition(":")
        if variant not in VARIANTS or jit not in JIT_SETTINGS:
            raise app.UsageError(f"--probe={_PROBE.value!r} must be 'variant:jit'")
        if len(_DTYPE_POLICY.value) != 1:
            raise app.UsageError("--probe measures one --dtype_policy")
        _probe_memory(variant, jit, _DTYPE_POLICY.value[0])
        return
    description, records = run()
    settings = (
        f"{_ARCH.value} {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value} batch {_BATCH_SIZE.value}, "
        f"{','.join(_DTYPE_POLICY.value)}, {_REPLICAS.value} replica(s), "
        f"{_THREADS.value or 'default'} intra-op threads, {_WARMUP_STEPS.value} warm-up + "
        f"{_TIMED_STEPS.value} timed steps per variant, interleaved; x plain = median of "
        "per-round ratios (wall clock; CPU = this process's CPU time); peak = TF allocator "
        "peak over the memory steps, step = peak - allocator use before them (see the "
        "module docstring)"
    )
    header = [common.format_machine(description), settings]
    if "torch" in description:
        header.append(
            f"torch {description['torch']} ({description['torch_threads']} threads), "
            f"{_TORCH_REFERENCE.value} model code, interleaved with ours; x torch = median of "
            "per-round ratios ours / torch (same variant and policy)"
        )
    common.print_report(header, records, COLUMNS)


if __name__ == "__main__":
    app.run(main)
