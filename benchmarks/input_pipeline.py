"""Images per second of the tf.data training pipeline vs what the CGC step consumes.

  python -m benchmarks.input_pipeline --image_size=224 --batch_size=16 --arch=resnet18

Writes `--num_images` JPEGs (`--jpeg_width` x `--jpeg_height`, smooth random
content) into a temporary `root/train/<class>/` folder and, for each of
`--inputs`, builds `cgc_tf.data.train_dataset` (decoding, the deterministic
view and the classification view, batching, prefetch) and iterates it for
`--epochs` epochs: `folder` reads `folder:root` (one file per image);
`records` first writes the folder as sharded record files with
`cgc_tf.data.prepare_folder` (`cgc-prepare`; `--shard_mib`, timed as
`prepare_s`) and reads those by name (parallel interleave over the files).
The decoded images of a small dataset are cached in memory after the first
epoch (`cgc_tf.data.pipeline.CACHE_MAX_BYTES`), so epoch 1 measures decoding +
views and later epochs the views only; `--cache=off` lowers that limit to 0
(datasets too large to cache), so every epoch decodes.
Then it times `--consumer_steps` CGC training steps (`--consumer_variant`) of
`--arch` on batches of the same size, and reports the ratio
pipeline images/s / step images/s (target: >= 3). The two are measured one
after the other: in training they share the CPU, so the ratio says how much
of the CPU the pipeline leaves to the step, not a wall-clock speed-up.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

_NUM_IMAGES = flags.DEFINE_integer("num_images", 256, "JPEG files to generate (>= batch_size).")
_JPEG_WIDTH = flags.DEFINE_integer("jpeg_width", 320, "Width of the JPEGs in pixels (>= 8).")
_JPEG_HEIGHT = flags.DEFINE_integer("jpeg_height", 240, "Height of the JPEGs in pixels (>= 8).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 4, "Class folders (>= 1).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Model input side S in pixels (>= 8).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Batch size (>= 1).")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Passes over the folder (>= 1).")
_INPUTS = flags.DEFINE_list(
    "inputs", ["folder", "records"],
    "Inputs to time, a subset of folder (image files) and records (cgc-prepare's files).",
)
_SHARD_MIB = flags.DEFINE_float(
    "shard_mib", 4.0, "records input: target record file size in MiB (> 0), as cgc-prepare's."
)
_CACHE = flags.DEFINE_enum(
    "cache", "auto", ("auto", "off"), "auto: the pipeline's caching rule; off: never cache."
)
_ARCH = flags.DEFINE_enum(
    "arch", "resnet18", ("small_resnet", "resnet18", "resnet34", "resnet50"), "Consumer backbone."
)
_CONSUMER_VARIANT = flags.DEFINE_enum(
    "consumer_variant", "cgc3", ("cgc3", "cgc2", "none"), "Step to compare with (none: skip)."
)
_CONSUMER_STEPS = flags.DEFINE_integer("consumer_steps", 3, "Timed consumer steps (>= 1).")
_JIT_COMPILE = flags.DEFINE_enum(
    "jit_compile", "auto", ("false", "true", "auto"), "XLA setting of the consumer step."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the images, shuffling and crops.")


def _check_flags():
    common.check_minimums(
        (
            ("num_images", _NUM_IMAGES.value, max(1, _BATCH_SIZE.value)),
            ("jpeg_width", _JPEG_WIDTH.value, 8),
            ("jpeg_height", _JPEG_HEIGHT.value, 8),
            ("num_classes", _NUM_CLASSES.value, 1),
            ("image_size", _IMAGE_SIZE.value, 8),
            ("batch_size", _BATCH_SIZE.value, 1),
            ("epochs", _EPOCHS.value, 1),
            ("consumer_steps", _CONSUMER_STEPS.value, 1),
        )
    )
    unknown = [name for name in _INPUTS.value if name not in INPUTS]
    if unknown or not _INPUTS.value or len(set(_INPUTS.value)) != len(_INPUTS.value):
        raise app.UsageError(
            f"--inputs={','.join(_INPUTS.value)} must be distinct names from {list(INPUTS)}"
        )
    if _SHARD_MIB.value <= 0:
        raise app.UsageError(f"--shard_mib={_SHARD_MIB.value} must be > 0")


def write_jpegs(root, num_images, width, height, num_classes, seed):
    """Writes `num_images` JPEGs into root/train/class_<i>/ (round-robin over classes).

    The content is a random low-resolution pattern upscaled plus noise, so the
    files compress like photographs rather than like pure noise.

    Returns:
      Total size of the files in bytes.
    """
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    total = 0
    for index in range(num_images):
        folder = os.path.join(root, "train", f"class_{index % num_classes}")
        os.makedirs(folder, exist_ok=True)
        coarse = rng.random((1, height // 16 + 1, width // 16 + 1, 3), dtype=np.float32)
        smooth = tf.image.resize(coarse, (height, width), method="bicubic")[0].numpy()
        pixels = np.clip(255 * smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
        encoded = tf.io.encode_jpeg(pixels, quality=90).numpy()
        with open(os.path.join(folder, f"{index:05d}.jpg"), "wb") as file:
            file.write(encoded)
        total += len(encoded)
    return total


INPUTS = ("folder", "records")
# The records input's dataset name in its temporary data_dir.
RECORDS_NAME = "input_pipeline_benchmark"


def prepare_input(kind, root):
    """The dataset to read for input `kind`: (dataset name, data_dir, prepare seconds)."""
    import time

    import cgc_tf.data

    if kind == "folder":
        return f"folder:{root}", None, 0.0
    data_dir = os.path.join(root, "records")
    start = time.perf_counter()
    cgc_tf.data.prepare_folder(root, RECORDS_NAME, data_dir, shard_mib=_SHARD_MIB.value)
    return RECORDS_NAME, data_dir, time.perf_counter() - start


def time_pipeline(dataset_name, data_dir=None):
    """Builds the dataset and iterates it; returns (setup seconds, list of epoch dicts)."""
    import time

    import cgc_tf.data
    from cgc_tf.data import pipeline

    if _CACHE.value == "off":
        # The pipeline caches decoded images of datasets up to CACHE_MAX_BYTES; a
        # limit of 0 reproduces a dataset too large to cache, where every epoch decodes.
        pipeline.CACHE_MAX_BYTES = 0
    start = time.perf_counter()
    dataset = cgc_tf.data.train_dataset(
        dataset_name, _BATCH_SIZE.value, _IMAGE_SIZE.value, data_dir=data_dir, seed=_SEED.value
    )
    setup_s = time.perf_counter() - start
    epochs = []
    for epoch in range(_EPOCHS.value):
        images = 0
        start = time.perf_counter()
        for features, labels in dataset:
            # The last element's numpy() waits for the batch, as a consumer would.
            images += int(labels.shape[0])
            features["image"].numpy()
        seconds = time.perf_counter() - start
        epochs.append({"epoch": epoch + 1, "images": images, "seconds": seconds,
                       "images_per_s": images / seconds})
    return setup_s, epochs


def time_consumer():
    """Seconds per CGC step (median) on batches of the pipeline's shape, or None."""
    if _CONSUMER_VARIANT.value == "none":
        return None
    batch = common.random_batch(_BATCH_SIZE.value, _IMAGE_SIZE.value, 10, _SEED.value)
    model = common.build_step_model(
        _CONSUMER_VARIANT.value, _ARCH.value, _IMAGE_SIZE.value, 10, _JIT_COMPILE.value, 0.01,
        _SEED.value,
    )
    step = common.make_train_step(model, _CONSUMER_VARIANT.value, batch)
    times = common.interleaved_times({"step": step}, 1, _CONSUMER_STEPS.value)
    return common.summarize(times["step"])


def run(root):
    """Returns (machine description, records)."""
    description = common.machine_description()
    jpeg_bytes = write_jpegs(
        root, _NUM_IMAGES.value, _JPEG_WIDTH.value, _JPEG_HEIGHT.value, _NUM_CLASSES.value,
        _SEED.value,
    )
    timings = []
    for kind in _INPUTS.value:
        dataset_name, data_dir, prepare_s = prepare_input(kind, root)
        timings.append((kind, prepare_s) + time_pipeline(dataset_name, data_dir))
    consumer = time_consumer()
    description["load_average_after"] = common.load_average()
    common_fields = {
        "benchmark": "input_pipeline",
        "num_images": _NUM_IMAGES.value,
        "jpeg_size": [_JPEG_WIDTH.value, _JPEG_HEIGHT.value],
        "jpeg_mib": common.mebibytes(jpeg_bytes),
        "image_size": _IMAGE_SIZE.value,
        "batch_size": _BATCH_SIZE.value,
        "cache": _CACHE.value,
        "machine": description,
    }
    records = []
    for kind, prepare_s, setup_s, epochs in timings:
        base = dict(common_fields, input=kind, prepare_s=prepare_s, setup_s=setup_s)
        if kind == "records":
            base["shard_mib"] = _SHARD_MIB.value
        for epoch in epochs:
            records.append(dict(base, kind="pipeline_epoch", **epoch))
        # The steady state: the last epoch (cached, if the pipeline caches).
        summary = dict(base, kind="summary", pipeline_images_per_s=epochs[-1]["images_per_s"],
                       first_epoch_images_per_s=epochs[0]["images_per_s"])
        if consumer is not None:
            summary.update(
                consumer_variant=_CONSUMER_VARIANT.value,
                arch=_ARCH.value,
                consumer_median_s=consumer["median_s"],
                consumer_images_per_s=_BATCH_SIZE.value / consumer["median_s"],
            )
            summary["pipeline_to_step_ratio"] = (
                summary["pipeline_images_per_s"] / summary["consumer_images_per_s"]
            )
            summary["first_epoch_to_step_ratio"] = (
                summary["first_epoch_images_per_s"] / summary["consumer_images_per_s"]
            )
        records.append(summary)
    return description, records


COLUMNS = [
    ("input", "input"),
    ("kind", "row"),
    ("epoch", "epoch"),
    ("images_per_s", "pipeline img/s"),
    ("pipeline_images_per_s", "last epoch img/s"),
    ("first_epoch_images_per_s", "epoch 1 img/s"),
    ("consumer_images_per_s", "CGC step img/s"),
    ("pipeline_to_step_ratio", "last / step"),
    ("first_epoch_to_step_ratio", "epoch 1 / step"),
]


def main(argv):
    del argv  # Unused.
    import tempfile

    _check_flags()
    with tempfile.TemporaryDirectory(prefix="input_pipeline_") as root:
        description, records = run(root)
    summaries = [r for r in records if r["kind"] == "summary"]
    setup = "; ".join(
        f"{r['input']}: prepare {r['prepare_s']:.2f} s, dataset setup {r['setup_s']:.2f} s"
        for r in summaries
    )
    settings = (
        f"{_NUM_IMAGES.value} JPEGs {_JPEG_WIDTH.value}x{_JPEG_HEIGHT.value} "
        f"({summaries[0]['jpeg_mib']:.1f} MiB) -> views {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}, "
        f"batch {_BATCH_SIZE.value}, cache={_CACHE.value}; {setup}; "
        f"consumer: {_CONSUMER_VARIANT.value} step of {_ARCH.value}"
    )
    common.print_report([common.format_machine(description), settings], records, COLUMNS)


if __name__ == "__main__":
    app.run(main)
