"""Seconds per CGC step on one device vs two replicas, for the same global batch.

  python -m benchmarks.replicas
  python -m benchmarks.replicas --arch=resnet18 --image_size=64 --global_batch=32 --views=2

Settings, all the same CGCModel, global batch and SGD optimizer:
  one device                     OneDeviceStrategy on the first device;
  2 replicas, local negatives    MirroredStrategy over two devices, each replica
                                 contrasting its own half of the batch
                                 (global_negatives=False);
  2 replicas, global negatives   the same with the heatmaps of both replicas
                                 all-gathered as negatives (global_negatives=True).
The two devices are the first two GPUs, or, with fewer than two GPUs, two logical
devices carved out of the CPU. Those share the same cores, so on a CPU the rows show
what the distribution machinery costs (splitting the batch, all-reducing the
gradients, the all-gather and its backward all-reduce), not a speed-up.

All settings are built in this process and their timed steps interleaved
(`common.interleaved_times`); "x 1 device" is the median of the per-round ratios
to the one-device step, which is stable on a loaded machine. A step is
`model.train_function` on a distributed iterator, as in fit (`common.make_train_step`).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

ARCHS = ("small_resnet", "resnet18", "resnet34", "resnet50")
ONE_DEVICE = "one device"
LOCAL = "2 replicas, local negatives"
GLOBAL = "2 replicas, global negatives"
SETTINGS = (ONE_DEVICE, LOCAL, GLOBAL)

_ARCH = flags.DEFINE_enum("arch", "small_resnet", ARCHS, "Backbone (cgc_tf.backbones.build).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 48, "Input side S in pixels (>= 16).")
_GLOBAL_BATCH = flags.DEFINE_integer(
    "global_batch", 32, "Images per step summed over replicas (even, >= 4: 2 per replica)."
)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Number of classes (>= 2).")
_VIEWS = flags.DEFINE_enum("views", "3", ("2", "3"), "CGCModel views (3 = METHOD.md).")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 3, "Untimed steps per setting (>= 1).")
_TIMED_STEPS = flags.DEFINE_integer("timed_steps", 10, "Timed steps per setting (>= 5).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the random batch.")


def _check_flags():
    common.check_minimums(
        (
            ("image_size", _IMAGE_SIZE.value, 16),
            ("global_batch", _GLOBAL_BATCH.value, 4),
            ("num_classes", _NUM_CLASSES.value, 2),
            ("warmup_steps", _WARMUP_STEPS.value, 1),
            ("timed_steps", _TIMED_STEPS.value, 5),
        )
    )
    if _GLOBAL_BATCH.value % 2:
        raise app.UsageError(f"--global_batch={_GLOBAL_BATCH.value} must be even (2 replicas)")


def _devices():
    """Two device names: the first two GPUs, else two logical CPU devices (carved here)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) < 2:
        # Before any TensorFlow op: logical devices are fixed when the runtime starts.
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
        )
        return [device.name for device in tf.config.list_logical_devices("CPU")[:2]]
    return [device.name for device in tf.config.list_logical_devices("GPU")[:2]]


def _build(global_negatives):
    import keras

    import cgc_tf
    from cgc_tf import backbones

    keras.utils.set_random_seed(_SEED.value)
    size = _IMAGE_SIZE.value
    backbone, target_layer = backbones.build(_ARCH.value, (size, size, 3), _NUM_CLASSES.value)
    model = cgc_tf.CGCModel(
        backbone, target_layer=target_layer, views=int(_VIEWS.value),
        global_negatives=global_negatives,
    )
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9, weight_decay=1e-4)
    # XLA compiles for one device: it cannot run the two-replica step.
    model.compile(optimizer=optimizer, jit_compile=False)
    return model


def run():
    """Times the three settings; returns (machine description, records)."""
    import tensorflow as tf

    devices = _devices()
    description = common.machine_description()
    # One MirroredStrategy for both two-replica settings: a second one in the same
    # process reuses the first one's collective keys and aborts ("Collective
    # instance ... expected type ...").
    mirrored = tf.distribute.MirroredStrategy(devices)
    strategies = {
        ONE_DEVICE: tf.distribute.OneDeviceStrategy(devices[0]),
        LOCAL: mirrored,
        GLOBAL: mirrored,
    }
    batch = common.random_batch(
        _GLOBAL_BATCH.value, _IMAGE_SIZE.value, _NUM_CLASSES.value, _SEED.value
    )
    variant = f"cgc{_VIEWS.value}"
    steps = {}
    for setting in SETTINGS:
        with strategies[setting].scope():
            model = _build(global_negatives=setting == GLOBAL)
        steps[setting] = common.make_train_step(model, variant, batch, strategies[setting])
    times = common.interleaved_times(steps, _WARMUP_STEPS.value, _TIMED_STEPS.value)
    description["load_average_after"] = common.load_average()
    records = []
    for setting in SETTINGS:
        replicas = strategies[setting].num_replicas_in_sync
        record = {
            "benchmark": "replicas",
            "setting": setting,
            "replicas": replicas,
            "global_negatives": setting == GLOBAL,
            "devices": devices[:replicas],
            "arch": _ARCH.value,
            "image_size": _IMAGE_SIZE.value,
            "global_batch": _GLOBAL_BATCH.value,
            "per_replica_batch": _GLOBAL_BATCH.value // replicas,
            "views": int(_VIEWS.value),
            "num_classes": _NUM_CLASSES.value,
        }
        record.update(common.summarize(times[setting]))
        record["images_per_s"] = _GLOBAL_BATCH.value / record["median_s"]
        record.update(common.ratios_to(times[setting], times[ONE_DEVICE], "one_device"))
        record["machine"] = description
        records.append(record)
    return description, records


COLUMNS = [
    ("setting", "setting"),
    ("per_replica_batch", "batch/replica"),
    ("median_s", "median s"),
    ("min_s", "min s"),
    ("max_s", "max s"),
    ("ratio_to_one_device", "x 1 device"),
    ("cpu_median_s", "CPU s"),
    ("cpu_ratio_to_one_device", "CPU x 1 device"),
    ("images_per_s", "img/s"),
]


def main(argv):
    del argv  # Unused.
    _check_flags()
    description, records = run()
    settings = (
        f"{_ARCH.value} {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}, views {_VIEWS.value}, global "
        f"batch {_GLOBAL_BATCH.value} on {records[1]['devices']}; {_WARMUP_STEPS.value} warm-up "
        f"+ {_TIMED_STEPS.value} timed steps per setting, interleaved; x 1 device = median of "
        "per-round ratios (wall clock; CPU = this process's CPU time)"
    )
    common.print_report([common.format_machine(description), settings], records, COLUMNS)


if __name__ == "__main__":
    app.run(main)
