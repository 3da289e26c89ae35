"""cgc-train: train a classifier with Contrastive Grad-CAM Consistency.

  cgc-train                                  # the embedded main job (cluttered digits)
  cgc-train --flagfile=train/configs/imagenet_resnet50.cfg --data_dir=/data/tfds
  cgc-train --model_dir=runs/a --epochs=30   # continues runs/a if it holds a checkpoint

Flags are the fields of `cgc_tf.config.TrainConfig` (same names, defaults and help
texts; train/config_flags.py generates them); the work is
`cgc_tf.training.run_training` (model_dir layout: docs/architecture.md), then --export
writes a verified SavedModel and ONNX. Exit codes: 0 done; 1 invalid settings or a
failed run; 143 stopped by SIGTERM after saving a checkpoint (re-run to resume).
"""

import dataclasses
import os
import sys

# Before TensorFlow is imported: hide its C++ start-up chatter unless asked for.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from cgc_tf import callbacks  # noqa: E402
from cgc_tf import console  # noqa: E402
from cgc_tf import data  # noqa: E402
from cgc_tf import export  # noqa: E402
from cgc_tf import training  # noqa: E402

try:  # installed: the binaries are packages cgc_tf_train, cgc_tf_evaluate, ...
    from cgc_tf_train import config_flags  # noqa: E402
except ModuleNotFoundError:  # a checkout on sys.path (Bazel's py_binary, python -m train.main)
    from train import config_flags  # noqa: E402

_EXIT_PREEMPTED = 128 + 15  # the shell's code for "terminated by SIGTERM"

# One flag per TrainConfig field, with the field's default and help text.
_CONFIG_FLAGS = config_flags.define_config_flags()
# Makes them this binary's key flags: --help lists them.
flags.adopt_module_key_flags(config_flags)


def config_from_flags():
    """The TrainConfig of the parsed flags (flag names are the field names)."""
    return config_flags.config_from_flags(_CONFIG_FLAGS)


def _export(config):
    """Exports model_dir/model.keras to model_dir/export, verified, with the class names."""
    info = data.dataset_info(config.dataset, data_dir=config.data_dir, image_size=config.image_size)
    report = export.export_model(
        export.load_model(config.model_dir),
        export.default_export_dir(config.model_dir),
        class_names=list(info.class_names),
        extra_metadata={"training_config": dataclasses.asdict(config)},
        overwrite=True,
    )
    print(export.format_summary(report))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    devices = console.setup(verbose=flags.FLAGS["verbosity"].present)
    try:
        config = config_from_flags().validate()
        # The precision follows from the devices; run_training prints its choice.
        print(f"cgc-train: {devices} visible, strategy {config.strategy}")
        metrics = training.run_training(config)
        # None on the non-chief workers of --strategy=multi_worker: only the chief exports.
        if config.export and metrics is not None:
            _export(config)
    except callbacks.TrainingPreempted as error:
        print(f"cgc-train: {error}", file=sys.stderr)
        return _EXIT_PREEMPTED
    except (ValueError, OSError, callbacks.NonFiniteLossError, export.VerificationError) as error:
        logging.debug("cgc-train failed", exc_info=True)
        print(f"cgc-train: {error}\n(--verbosity=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


def run():
    """Console-script entry point (cgc-train)."""
    console.prepare_binary(flags.FLAGS, sys.modules[__name__])
    app.run(main)


if __name__ == "__main__":
    run()
