"""cgc-train: train a classifier with Contrastive Grad-CAM Consistency.

  cgc-train                                  # the embedded main job (cluttered digits)
  cgc-train --flagfile=train/configs/imagenet_resnet50.cfg --data_dir=/data/tfds
  cgc-train --model_dir=runs/a --epochs=30   # continues runs/a if it holds a checkpoint

Flags are the fields of `cgc_tf.config.TrainConfig` (same names and defaults); the
work is `cgc_tf.training.run_training` (model_dir layout: docs/architecture.md), then
--export writes a verified SavedModel and ONNX. Exit codes: 0 done; 1 invalid settings
or a failed run; 143 stopped by SIGTERM after saving a checkpoint (re-run to resume).
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
from cgc_tf import config as config_lib  # noqa: E402
from cgc_tf import console  # noqa: E402
from cgc_tf import data  # noqa: E402
from cgc_tf import export  # noqa: E402
from cgc_tf import training  # noqa: E402

_D = config_lib.TrainConfig()
_EXIT_PREEMPTED = 128 + 15  # the shell's code for "terminated by SIGTERM"

_DATASET = flags.DEFINE_string(
    "dataset", _D.dataset, "'cluttered_digits' (embedded), 'cluttered_digits_holdout' (for "
    "tuning: trains on 6/7 of its train digits, validates and reports on the other 1/7), a "
    "tfds name prepared in --data_dir, or 'folder:/root' (root/train/<class>/*, "
    "root/val|test/<class>/*).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", _D.data_dir, "tfds data directory (unset: ~/tensorflow_datasets).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", _D.image_size, "Input side in pixels (>= 16; >= 32 for resnet*).")
_EXAMPLES_PER_CLASS = flags.DEFINE_integer(
    "examples_per_class", _D.examples_per_class, "Labelled images per class (>= 1); unset: all.")
_UNLABELED = flags.DEFINE_string(
    "unlabeled", _D.unlabeled, "Unlabelled images for semi-supervised CGC (a --dataset name).")
_UNLABELED_SPLIT = flags.DEFINE_string(
    "unlabeled_split", _D.unlabeled_split, "Split of --unlabeled; unset: its train split.")
_SKIP_CORRUPT_IMAGES = flags.DEFINE_bool(
    "skip_corrupt_images", _D.skip_corrupt_images, "Skip and count undecodable images.")
_ARCH = flags.DEFINE_string(
    "arch", _D.arch, f"Backbone: one of {', '.join(config_lib.ARCHS)}; a keras.applications "
    "model name (e.g. MobileNetV2, weights=None); or module:callable(input_shape, num_classes).",
)
_TARGET_LAYER = flags.DEFINE_string(
    "target_layer", _D.target_layer, "Grad-CAM layer (4-D output); unset: the arch's last block.")
_INIT_WEIGHTS = flags.DEFINE_string(
    "init_weights", _D.init_weights, "Local .weights.h5 to start from; layers of other shapes "
    "(a head for another class count) stay random.")
_SYNCHRONIZED_BATCH_NORM = flags.DEFINE_bool(
    "synchronized_batch_norm", _D.synchronized_batch_norm, "BatchNorm batch statistics over "
    "all replicas (all-reduced every step) instead of per replica.")
_EPOCHS = flags.DEFINE_integer("epochs", _D.epochs, "Total epochs (>= 1), resumed ones included.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", _D.batch_size, "Global batch in images (>= 2 per replica for contrastive).")
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    "steps_per_epoch", _D.steps_per_epoch, "Optimizer steps per epoch (>= 1); unset: one pass.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", _D.learning_rate, "Peak SGD rate (> 0).")
_MOMENTUM = flags.DEFINE_float("momentum", _D.momentum, "SGD momentum in [0, 1).")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", _D.weight_decay, "Weight decay (>= 0).")
_WEIGHT_DECAY_MODE = flags.DEFINE_enum(
    "weight_decay_mode", _D.weight_decay_mode, config_lib.WEIGHT_DECAY_MODES,
    "coupled: torch.optim.SGD's L2 in the momentum (the reference); decoupled: Keras' SGD.")
_LR_SCHEDULE = flags.DEFINE_enum(
    "lr_schedule", _D.lr_schedule, config_lib.LR_SCHEDULES,
    "step: x lr_decay_factor every lr_decay_epochs (or at lr_decay_milestones); cosine: to 0 "
    "at the last epoch; constant.")
_LR_DECAY_EPOCHS = flags.DEFINE_integer(
    "lr_decay_epochs", _D.lr_decay_epochs, "Epochs between step decays (>= 1).")
_LR_DECAY_MILESTONES = flags.DEFINE_multi_integer(
    "lr_decay_milestones", _D.lr_decay_milestones, "Epochs at which the step schedule decays "
    "instead of every lr_decay_epochs (torch's MultiStepLR); repeat the flag per epoch.")
_LR_DECAY_FACTOR = flags.DEFINE_float(
    "lr_decay_factor", _D.lr_decay_factor, "Step decay factor in (0, 1].")
_WARMUP_EPOCHS = flags.DEFINE_integer(
    "warmup_epochs", _D.warmup_epochs, "Epochs of linear warmup (>= 0).")
_LAMBDA = flags.DEFINE_float(
    "lambda_", _D.lambda_, "Consistency loss weight (>= 0; 0 = the lambda=0 ablation: the "
    "multi-view step, consistency reported without gradient). Alias --lambda.")
_TEMPERATURE = flags.DEFINE_float("temperature", _D.temperature, "InfoNCE temperature (> 0).")
_CONSISTENCY = flags.DEFINE_enum(
    "consistency", _D.consistency, config_lib.CONSISTENCIES,
    "contrastive: CGC; mse: the GC baseline (the reference runs it at lambda 1000); none: "
    "the plain baseline (one view, one cross-entropy, no Grad-CAM; labelled data only).")
_VIEWS = flags.DEFINE_integer(
    "views", _D.views, "Cross-entropy views: 3 (docs/method.md) or 2 (no classification view).")
_TRANSFORM_MIN_AREA = flags.DEFINE_float(
    "transform_min_area", _D.transform_min_area, "Smallest area fraction of T's random crop, "
    "in (0, 1] (docs/method.md: 0.08).")
_GLOBAL_NEGATIVES = flags.DEFINE_bool(
    "global_negatives", _D.global_negatives, "Negatives from all replicas' heatmaps.")
_SEED = flags.DEFINE_integer("seed", _D.seed, "Random seed (>= 0).")
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", _D.model_dir, "Output directory; resumed when it holds a checkpoint.")
_RESUME = flags.DEFINE_bool(
    "resume", _D.resume, "Resume from model_dir; --noresume deletes its checkpoints and log.")
_EVAL_EVERY = flags.DEFINE_integer(
    "eval_every", _D.eval_every, "Evaluate and write heatmaps every N epochs (>= 1).")
_EXPORT = flags.DEFINE_bool(
    "export", _D.export, "Write a verified SavedModel and ONNX to model_dir/export at the end.")
_STRATEGY = flags.DEFINE_enum("strategy", _D.strategy, config_lib.STRATEGIES, "tf.distribute.")
_TPU = flags.DEFINE_string("tpu", _D.tpu, "TPU name or address, with --strategy=tpu.")
_MIXED_PRECISION = flags.DEFINE_enum(
    "mixed_precision", _D.mixed_precision, config_lib.MIXED_PRECISIONS, "Keras dtype policy.")
_JIT_COMPILE = flags.DEFINE_enum(
    "jit_compile", _D.jit_compile, config_lib.JIT_COMPILES, "XLA for the train step.")
flags.DEFINE_alias("lambda", "lambda_")

_HOLDERS = (
    _DATASET, _DATA_DIR, _IMAGE_SIZE, _EXAMPLES_PER_CLASS, _UNLABELED, _UNLABELED_SPLIT,
    _SKIP_CORRUPT_IMAGES, _ARCH, _TARGET_LAYER, _INIT_WEIGHTS, _SYNCHRONIZED_BATCH_NORM,
    _EPOCHS, _BATCH_SIZE,
    _STEPS_PER_EPOCH, _LEARNING_RATE, _MOMENTUM, _WEIGHT_DECAY, _WEIGHT_DECAY_MODE,
    _LR_SCHEDULE, _LR_DECAY_EPOCHS, _LR_DECAY_MILESTONES,
    _LR_DECAY_FACTOR, _WARMUP_EPOCHS, _LAMBDA, _TEMPERATURE, _CONSISTENCY, _VIEWS,
    _TRANSFORM_MIN_AREA, _GLOBAL_NEGATIVES, _SEED, _MODEL_DIR, _RESUME, _EVAL_EVERY, _EXPORT,
    _STRATEGY, _TPU, _MIXED_PRECISION, _JIT_COMPILE,
)


def config_from_flags():
    """The TrainConfig of the parsed flags (flag names are the field names)."""
    return config_lib.TrainConfig(**{holder.name: holder.value for holder in _HOLDERS})


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
