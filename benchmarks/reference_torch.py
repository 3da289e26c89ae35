"""The reference (PyTorch) CGC step vs its plain step, timed alone.

  pip install torch          # optional benchmark dependency, not a cgc-tf requirement
  python -m benchmarks.reference_torch --arch=resnet18 --image_size=224 --batch_size=16

The steps are `benchmarks.torch_steps`' (see there): by default a transcription
in plain PyTorch of what the published CGC code computes per step (plain, cgc3,
cgc2); `--model_code=reference` times the published code itself
(models/resnet_multigpu_cgc.py of `--reference_dir`, default
../shared/reference-cgc beside this repository: plain and cgc3, the latter
224x224 only). `--autocast=bfloat16` (or float16) runs forward and loss under
`torch.autocast(device_type="cpu", ...)`, torch's mixed precision; a step that
fails under it (the reference's CGC forward calls numpy on a bfloat16 tensor) is
reported with its error instead of a time. Timings are interleaved as in
step_time (wall clock and this process's CPU time).

Side by side with our step, float32 and mixed precision, in one process with
the timed steps of both frameworks interleaved (ResNet-18 224, batch 16):

  python -m benchmarks.step_time --variants=plain,cgc3 --dtype_policy=float32,auto \
    --torch_reference=reference --memory=none
"""

from absl import app
from absl import flags

from benchmarks import common
from benchmarks import torch_steps

VARIANTS = common.STEP_VARIANTS

_ARCH = flags.DEFINE_enum("arch", "resnet18", torch_steps.ARCHS, "Backbone.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input side S in pixels (>= 32).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Batch size (>= 2: InfoNCE needs negatives).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Number of classes (>= 2).")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Subset of {list(VARIANTS)}.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 2, "Untimed steps per variant (>= 1).")
_TIMED_STEPS = flags.DEFINE_integer("timed_steps", 5, "Timed steps per variant (>= 1).")
_THREADS = flags.DEFINE_integer("threads", None, "torch.set_num_threads; default torch's own.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the batch.")
_MODEL_CODE = flags.DEFINE_enum(
    "model_code", "transcription", torch_steps.MODEL_CODES,
    "transcription: the step written here; reference: the reference's own model code.",
)
_REFERENCE_DIR = flags.DEFINE_string(
    "reference_dir",
    torch_steps.DEFAULT_REFERENCE_DIR,
    "The reference repository (holds models/resnet_multigpu_cgc.py), for --model_code=reference.",
)
_AUTOCAST = flags.DEFINE_enum(
    "autocast", "none", torch_steps.AUTOCASTS, "torch.autocast on the CPU for forward and loss."
)


def main(argv):
    del argv  # Unused.
    import torch

    if _THREADS.value:
        torch.set_num_threads(_THREADS.value)
    common.check_subsets((("variants", _VARIANTS.value, VARIANTS),))
    common.check_minimums(
        (("batch_size", _BATCH_SIZE.value, 2), ("image_size", _IMAGE_SIZE.value, 32))
    )
    reference = _MODEL_CODE.value == "reference"
    if reference:
        common.check_subsets(
            (("variants", _VARIANTS.value, torch_steps.MODEL_CODE_VARIANTS["reference"]),)
        )
        if "cgc3" in _VARIANTS.value and _IMAGE_SIZE.value != 224:
            raise app.UsageError("--model_code=reference's CGC step needs --image_size=224")
    batch = torch_steps.random_batch(
        _BATCH_SIZE.value, _IMAGE_SIZE.value, _NUM_CLASSES.value, _SEED.value
    )
    steps, errors = {}, {}
    for variant in _VARIANTS.value:
        step = torch_steps.make_step(
            _MODEL_CODE.value, variant, _ARCH.value, _NUM_CLASSES.value, batch, _SEED.value,
            autocast=_AUTOCAST.value, reference_dir=_REFERENCE_DIR.value,
        )
        try:
            step()  # one untimed step: a step that cannot run is reported, not timed
        except Exception as error:  # pylint: disable=broad-except
            errors[variant] = f"{type(error).__name__}: {error}"
            continue
        steps[variant] = step
    description = common.host_description()
    times = common.interleaved_times(steps, _WARMUP_STEPS.value, _TIMED_STEPS.value)
    description.update(
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        load_average_after=common.load_average(),
    )
    records = []
    for variant in _VARIANTS.value:
        record = {
            "benchmark": "reference_torch",
            "variant": variant,
            "arch": _ARCH.value,
            "image_size": _IMAGE_SIZE.value,
            "batch_size": _BATCH_SIZE.value,
            "num_classes": _NUM_CLASSES.value,
            "model_code": _MODEL_CODE.value,
            "autocast": _AUTOCAST.value,
        }
        if variant in errors:
            record["error"] = errors[variant]
            records.append(record)
            continue
        record.update(common.summarize(times[variant]))
        if "plain" in times:
            record["plain_median_s"] = common.summarize(times["plain"])["median_s"]
            record.update(common.ratios_to(times[variant], times["plain"], "plain"))
        record["machine"] = description
        records.append(record)
    machine = (
        f"device: CPU {description['cpu']} x{description['cores']} cores; torch "
        f"{description['torch']} ({description['torch_threads']} threads); load average "
        f"{description['load_average']}"
    )
    settings = (
        f"reference (PyTorch, {_MODEL_CODE.value} code, autocast {_AUTOCAST.value}) "
        f"{_ARCH.value} {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value} batch "
        f"{_BATCH_SIZE.value}; {_WARMUP_STEPS.value} warm-up + {_TIMED_STEPS.value} timed steps, "
        "interleaved"
    )
    columns = [("variant", "variant"), *common.PLAIN_COMPARISON_COLUMNS, ("error", "error")]
    common.print_report([machine, settings], records, columns)


if __name__ == "__main__":
    app.run(main)
