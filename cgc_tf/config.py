"""Training settings: one frozen dataclass, the one home of every default.

`TrainConfig()` with no arguments is the embedded main job (cluttered digits,
small ResNet) that `cgc-train` runs without flags; each field's metadata holds
its flag's help text (train/config_flags.py makes the flags). `validate()` checks
every field at once and raises one `ValueError` listing all problems, before any
heavy work (data preparation, model building). Checks that need the model
(target layer, init weights) happen in `cgc_tf.training`.

A leaf module: standard library only (importing it still runs cgc_tf/__init__.py,
which imports TensorFlow).
"""

import dataclasses
import json
import os
import shutil
import uuid
from typing import Optional

# Mirrors `cgc_tf.backbones.BUILDERS` (checked by tests/config_test.py); copied
# rather than imported to keep this module free of TensorFlow.
ARCHS = ("small_resnet", "resnet18", "resnet34", "resnet50")
LR_SCHEDULES = ("step", "cosine", "constant")
CONSISTENCIES = ("contrastive", "mse", "none")
# Mirrors `cgc_tf.model.VIEWS` (checked by tests/config_test.py), for the same reason.
VIEWS = (2, 3)
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
# "auto": bfloat16 where the devices compute it natively, else float32
# (cgc_tf.distribute.resolve_mixed_precision).
MIXED_PRECISIONS = ("auto", "none", "mixed_float16", "mixed_bfloat16")
JIT_COMPILES = ("auto", "true", "false")
# Mirrors `cgc_tf.optimizers.WEIGHT_DECAY_MODES` (checked by tests/optimizers_test.py).
# "coupled" is torch.optim.SGD's L2 (the reference); "decoupled" is Keras' SGD form.
WEIGHT_DECAY_MODES = ("coupled", "decoupled")

EMBEDDED_DATASET = "cluttered_digits"
# The embedded dataset's holdout config: its train digits split into train and
# validation (every 7th digit), for tuning without the test split.
HOLDOUT_DATASET = EMBEDDED_DATASET + "_holdout"
# The elpv solar cells (optional extra `elpv`, cgc_tf/data/elpv): all cells or one
# cell type, each with its holdout config (train split into train and validation).
ELPV_DATASETS = (
    "elpv", "elpv_holdout", "elpv_mono", "elpv_mono_holdout", "elpv_poly", "elpv_poly_holdout",
)
# Names prepared offline by a builder of cgc_tf.data (no data_dir needed).
EMBEDDED_DATASETS = (EMBEDDED_DATASET, HOLDOUT_DATASET) + ELPV_DATASETS
FOLDER_PREFIX = "folder:"
# Smallest image side per architecture: the feature map of the target layer
# must keep at least 1x1 after the backbone's downsampling (4x small_resnet,
# 32x for the ImageNet ResNets).
MIN_IMAGE_SIZE = {"small_resnet": 16, "resnet18": 32, "resnet34": 32, "resnet50": 32}
# Checkpoints of the largest backbone (ResNet-50, weights + SGD momentum) take
# about 200 MB; refuse to start with less than this free in model_dir.
MIN_FREE_DISK_MB = 256


def _setting(default, help_text, choices=None, aliases=()):
    """A TrainConfig field: its default, and in its metadata what its flag shows.

    The binaries generate one flag per field from this (train/config_flags.py):
    metadata "help" is the help text, "choices" the allowed values (an enum flag
    for strings; `validate` checks them too), "aliases" other flag names.
    """
    metadata = {"help": help_text}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if aliases:
        metadata["aliases"] = tuple(aliases)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `cgc_tf.training.run_training` needs; field names are the flag names.

    Each field's metadata holds its flag's help text (and choices): cgc-train's
    flags are generated from these fields, nothing restates them.

    Defaults are the embedded main job: `cluttered_digits` at 32x32 with the small
    ResNet and the CGC loss (paper lambda and temperature), sized for a 2-core CPU:
    two cross-entropy views and T's crops of at least half the image, because the
    paper's 8% crops often miss the digit of a 32x32 canvas. The paper's ImageNet
    and fine-grained settings are flagfiles in train/configs/.
    """

    # Data.
    dataset: str = _setting(
        EMBEDDED_DATASET,
        "'cluttered_digits' (embedded), 'cluttered_digits_holdout' (for tuning: trains on 6/7 "
        "of its train digits, validates and reports on the other 1/7), 'elpv' and its variants "
        "(optional extra), a tfds name prepared in --data_dir, or 'folder:/root' "
        "(root/train/<class>/*, root/val|test/<class>/*).",
    )
    data_dir: Optional[str] = _setting(
        None, "tfds data directory (unset: ~/tensorflow_datasets)."
    )
    image_size: int = _setting(32, "Input side in pixels (>= 16; >= 32 for resnet*).")
    examples_per_class: Optional[int] = _setting(
        None, "Labelled images per class (>= 1); unset: all."
    )
    unlabeled: Optional[str] = _setting(
        None, "Unlabelled images for semi-supervised CGC (a --dataset name)."
    )
    unlabeled_split: Optional[str] = _setting(
        None, "Split of --unlabeled; unset: its train split."
    )
    skip_corrupt_images: bool = _setting(False, "Skip and count undecodable images.")
    # Model.
    arch: str = _setting(
        "small_resnet",
        f"Backbone: one of {', '.join(ARCHS)}; a keras.applications model name (e.g. "
        "MobileNetV2, weights=None); or module:callable(input_shape, num_classes).",
    )
    target_layer: Optional[str] = _setting(
        None, "Grad-CAM layer (4-D output); unset: the arch's last block."
    )
    init_weights: Optional[str] = _setting(
        None,
        "Local .weights.h5 to start from; layers of other shapes (a head for another class "
        "count) stay random.",
    )
    synchronized_batch_norm: bool = _setting(
        False,
        "BatchNorm batch statistics over all replicas (all-reduced every step) instead of "
        "per replica.",
    )
    # Optimisation.
    epochs: int = _setting(15, "Total epochs (>= 1), resumed ones included.")
    batch_size: int = _setting(
        32, "Images per batch over all replicas (>= 1; >= 2 per replica for contrastive)."
    )
    steps_per_epoch: Optional[int] = _setting(
        None, "Optimizer steps per epoch (>= 1); unset: one pass."
    )
    learning_rate: float = _setting(0.05, "Peak SGD rate (> 0).")
    momentum: float = _setting(0.9, "SGD momentum in [0, 1).")
    weight_decay: float = _setting(5e-4, "Weight decay (>= 0).")
    weight_decay_mode: str = _setting(
        "coupled",
        "coupled: torch.optim.SGD's L2 in the momentum (the reference); decoupled: Keras' SGD.",
        choices=WEIGHT_DECAY_MODES,
    )
    lr_schedule: str = _setting(
        "cosine",
        "step: x lr_decay_factor every lr_decay_epochs (or at lr_decay_milestones); cosine: "
        "to 0 at the last epoch; constant.",
        choices=LR_SCHEDULES,
    )
    lr_decay_epochs: int = _setting(30, "Epochs between step decays (>= 1).")
    lr_decay_factor: float = _setting(0.1, "Step decay factor in (0, 1].")
    lr_decay_milestones: Optional[list[int]] = _setting(
        None,
        "Epochs at which the step schedule decays instead of every lr_decay_epochs (torch's "
        "MultiStepLR).",
    )
    warmup_epochs: int = _setting(1, "Epochs of linear warmup (>= 0).")
    # CGC objective.
    lambda_: float = _setting(
        0.5,
        "Consistency loss weight (>= 0; 0 = the lambda=0 ablation: the multi-view step, "
        "consistency reported without gradient). Alias --lambda.",
        aliases=("lambda",),
    )
    temperature: float = _setting(0.5, "InfoNCE temperature (> 0).")
    consistency: str = _setting(
        "contrastive",
        "contrastive: CGC; mse: the GC baseline (the reference runs it at lambda 1000); none: "
        "the plain baseline (one view, one cross-entropy, no Grad-CAM; labelled data only).",
        choices=CONSISTENCIES,
    )
    views: int = _setting(
        2,
        "Cross-entropy views: 3 (docs/method.md) or 2 (no classification view).",
        choices=VIEWS,
    )
    transform_min_area: float = _setting(
        0.5, "Smallest area fraction of T's random crop, in (0, 1] (docs/method.md: 0.08)."
    )
    global_negatives: bool = _setting(False, "Negatives from all replicas' heatmaps.")
    # Run.
    seed: int = _setting(0, "Random seed (>= 0).")
    model_dir: str = _setting(
        os.path.join("cgc_runs", EMBEDDED_DATASET),
        "Output directory; resumed when it holds a checkpoint.",
    )
    resume: bool = _setting(
        True, "Resume from model_dir; --noresume deletes its checkpoints and log."
    )
    eval_every: int = _setting(1, "Evaluate and write heatmaps every N epochs (>= 1).")
    export: bool = _setting(
        True, "Write a verified SavedModel and ONNX to model_dir/export at the end."
    )
    # Hardware.
    strategy: str = _setting("default", "tf.distribute strategy.", choices=STRATEGIES)
    tpu: Optional[str] = _setting(None, "TPU name or address, with --strategy=tpu.")
    mixed_precision: str = _setting(
        "auto",
        "Keras dtype policy; auto: bfloat16 where the devices compute it natively, else "
        "float32.",
        choices=MIXED_PRECISIONS,
    )
    jit_compile: str = _setting("auto", "XLA for the train step.", choices=JIT_COMPILES)

    def replace(self, **changes):
        """A copy with `changes` applied (dataclasses.replace; unknown names raise)."""
        return dataclasses.replace(self, **changes)

    def to_json(self):
        """The config as a JSON object string (dataclasses.asdict, sorted keys)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        """Parses `to_json` output; fields missing from `text` take their defaults.

        Raises:
          ValueError: if `text` is not a JSON object or names unknown fields.
        """
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"TrainConfig JSON must be an object, got {type(values).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"TrainConfig JSON has unknown fields {unknown}; known fields are {sorted(known)}"
            )
        return cls(**values)

    def validate(self):
        """Checks every field and that model_dir is writable; returns self.

        Creates `model_dir` if needed (and writes/removes a probe file there).

        Raises:
          ValueError: listing every invalid value, one per line.
        """
        errors = _field_errors(self)
        errors += _data_errors(self)
        errors += _model_dir_errors(self.model_dir)
        if errors:
            raise ValueError(
                "Invalid training configuration:\n" + "\n".join(f"  - {e}" for e in errors)
            )
        return self

    @property
    def uses_embedded_dataset(self):
        """True when `dataset` is prepared offline (`cluttered_digits`, `elpv`, their variants)."""
        return self.dataset in EMBEDDED_DATASETS


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _field_errors(config):
    """Range and enum checks that need no I/O."""
    errors = []

    def check(condition, message):
        if not condition:
            errors.append(message)

    def check_choice(name, allowed):
        value = getattr(config, name)
        check(value in allowed, f"{name}={value!r} is not one of {list(allowed)}")

    def check_int(name, minimum, optional=False):
        value = getattr(config, name)
        if optional and value is None:
            return
        check(
            _is_int(value) and value >= minimum,
            f"{name}={value!r} must be an integer >= {minimum}"
            + (" (or None)" if optional else ""),
        )

    check(
        config.arch in ARCHS or ":" in config.arch or config.arch[:1].isupper(),
        f"arch={config.arch!r} is not one of {list(ARCHS)}, a keras.applications model name "
        "(e.g. 'MobileNetV2') or 'module:callable'",
    )
    for field in dataclasses.fields(config):
        if "choices" in field.metadata:
            check_choice(field.name, field.metadata["choices"])
    minimum_size = MIN_IMAGE_SIZE.get(config.arch, min(MIN_IMAGE_SIZE.values()))
    check(
        _is_int(config.image_size) and config.image_size >= minimum_size,
        f"image_size={config.image_size!r} must be an integer >= {minimum_size} pixels "
        f"for arch={config.arch!r}",
    )
    check_int("epochs", 1)
    check_int("batch_size", 1)
    check_int("steps_per_epoch", 1, optional=True)
    check_int("examples_per_class", 1, optional=True)
    check_int("lr_decay_epochs", 1)
    milestones = config.lr_decay_milestones
    check(
        milestones is None
        or (
            isinstance(milestones, (list, tuple))
            and len(milestones) > 0
            and all(_is_int(epoch) and epoch >= 1 for epoch in milestones)
            and list(milestones) == sorted(set(milestones))
        ),
        f"lr_decay_milestones={milestones!r} must be None or increasing epochs >= 1",
    )
    if milestones is not None and config.lr_schedule != "step":
        errors.append(
            f"lr_decay_milestones={milestones!r} is only used with lr_schedule='step', got "
            f"{config.lr_schedule!r}"
        )
    check_int("warmup_epochs", 0)
    check_int("eval_every", 1)
    check_int("seed", 0)
    if (
        config.consistency == "contrastive"
        and _is_int(config.batch_size)
        and config.batch_size < 2
    ):
        errors.append(
            f"batch_size={config.batch_size!r} is too small for consistency='contrastive': "
            "InfoNCE needs >= 2 images per replica (the other images are the negatives)"
        )
    check(
        _is_number(config.learning_rate) and config.learning_rate > 0,
        f"learning_rate={config.learning_rate!r} must be > 0",
    )
    check(
        _is_number(config.momentum) and 0 <= config.momentum < 1,
        f"momentum={config.momentum!r} must be in [0, 1)",
    )
    check(
        _is_number(config.weight_decay) and config.weight_decay >= 0,
        f"weight_decay={config.weight_decay!r} must be >= 0",
    )
    check(
        _is_number(config.lr_decay_factor) and 0 < config.lr_decay_factor <= 1,
        f"lr_decay_factor={config.lr_decay_factor!r} must be in (0, 1]",
    )
    check(
        _is_number(config.lambda_) and config.lambda_ >= 0,
        f"lambda_={config.lambda_!r} must be >= 0 (0 = the lambda=0 ablation)",
    )
    check(
        _is_number(config.temperature) and config.temperature > 0,
        f"temperature={config.temperature!r} must be > 0",
    )
    check(
        _is_number(config.transform_min_area) and 0 < config.transform_min_area <= 1,
        f"transform_min_area={config.transform_min_area!r} must be in (0, 1]",
    )
    for name in (
        "global_negatives", "skip_corrupt_images", "resume", "export", "synchronized_batch_norm"
    ):
        value = getattr(config, name)
        check(isinstance(value, bool), f"{name}={value!r} must be True or False")
    for name in ("target_layer", "unlabeled_split", "tpu"):
        value = getattr(config, name)
        check(
            value is None or (isinstance(value, str) and value),
            f"{name}={value!r} must be a non-empty string or None",
        )
    if config.tpu is not None and config.strategy != "tpu":
        errors.append(f"tpu={config.tpu!r} is only used with strategy='tpu', got {config.strategy!r}")
    if config.consistency == "none" and config.unlabeled is not None:
        errors.append(
            f"unlabeled={config.unlabeled!r} needs a consistency loss; consistency='none' (the "
            "plain baseline) trains on labelled images only"
        )
    if config.unlabeled_split is not None and config.unlabeled is None:
        errors.append(
            f"unlabeled_split={config.unlabeled_split!r} needs unlabeled=<dataset name>"
        )
    if config.init_weights is not None:
        path = config.init_weights
        if not (isinstance(path, str) and path.endswith(".weights.h5")):
            errors.append(
                f"init_weights={path!r} must be a local Keras weights file ending in "
                "'.weights.h5' (nothing is downloaded)"
            )
        elif not os.path.isfile(path):
            errors.append(f"init_weights={path!r} does not exist")
    return errors


def _dataset_errors(name, data_dir, field):
    """Problems with one dataset name (`dataset` or `unlabeled`)."""
    if not isinstance(name, str) or not name:
        return [f"{field}={name!r} must be a non-empty dataset name"]
    if name.startswith(FOLDER_PREFIX):
        root = name[len(FOLDER_PREFIX):]
        if not os.path.isdir(root):
            return [f"{field}={name!r}: image folder {root!r} does not exist"]
        return []
    if name in EMBEDDED_DATASETS:
        return []
    # Any other name is a tensorflow-datasets dataset, which must already be
    # prepared locally: nothing is downloaded.
    if data_dir is None:
        return [
            f"{field}={name!r} is a tensorflow-datasets name and needs data_dir=<directory "
            f"where it was prepared> (nothing is downloaded; only {EMBEDDED_DATASET!r} and "
            f"'{FOLDER_PREFIX}/path' work without one)"
        ]
    return []


def _data_errors(config):
    errors = _dataset_errors(config.dataset, config.data_dir, "dataset")
    if config.unlabeled is not None:
        errors += _dataset_errors(config.unlabeled, config.data_dir, "unlabeled")
    needs_existing_dir = any(
        isinstance(name, str)
        and name not in EMBEDDED_DATASETS
        and not name.startswith(FOLDER_PREFIX)
        for name in (config.dataset, config.unlabeled)
        if name is not None
    )
    if config.data_dir is not None:
        if not isinstance(config.data_dir, str) or not config.data_dir:
            errors.append(f"data_dir={config.data_dir!r} must be a directory path or None")
        elif needs_existing_dir and not os.path.isdir(config.data_dir):
            errors.append(f"data_dir={config.data_dir!r} does not exist")
    return errors


def _model_dir_errors(model_dir):
    """Creates model_dir, writes and removes a probe file, checks free space."""
    if not isinstance(model_dir, str) or not model_dir:
        return [f"model_dir={model_dir!r} must be a directory path"]
    try:
        os.makedirs(model_dir, exist_ok=True)
        probe = os.path.join(model_dir, f".write_probe_{uuid.uuid4().hex}")
        with open(probe, "w") as f:
            f.write("probe")
        os.remove(probe)
    except OSError as e:
        return [f"model_dir={model_dir!r} is not writable: {e.strerror or e}"]
    free_mb = shutil.disk_usage(model_dir).free / 2**20
    if free_mb < MIN_FREE_DISK_MB:
        return [
            f"model_dir={model_dir!r} has {free_mb:.0f} MB free; need >= {MIN_FREE_DISK_MB} MB "
            "for checkpoints"
        ]
    return []
