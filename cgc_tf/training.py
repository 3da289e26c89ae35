"""`run_training(config)`: data, CGCModel, SGD + schedule, training with resume, final files.

Model directory (docs/architecture.md):

    model_dir/
      config.json                 the TrainConfig (written at the start and the end)
      model.keras                 the final CGCModel
      backbone.weights.h5         its backbone's weights alone: another run's
                                  init_weights (fine-tuning from this run)
      checkpoints/backup/         BackupAndRestore state: weights + optimizer after
                                  the last completed epoch (or at a SIGTERM)
      checkpoints/last_epoch.keras  the full model after the last completed epoch
      checkpoints/multi_worker/   strategy='multi_worker' only, instead of the two
                                  above: tf.train.Checkpoint (ckpt-<epoch>.*) of
                                  weights, optimizer, random state and epoch counter
      log.csv                     one row per epoch (continued on resume)
      tensorboard/                scalars (train/, validation/) and heatmaps/
      metrics.json                final evaluation on the eval split
      labelled_subset.json        with examples_per_class: the labelled examples per
                                  class (a resumed run checks it draws the same)
      input_stats/worker-<i>.json what input pipeline i (worker i) decoded: written
                                  by every worker after each epoch (data.InputStats)
      .lock                       held by the training process (run_lock): a second
                                  process on the same model_dir stops with an error

Two training paths drive the same `model.train_step`: Keras `fit` for every
strategy but 'multi_worker', and `cgc_tf.custom_loop.train` for
'multi_worker' (Keras 3 `fit` does not support MultiWorkerMirroredStrategy).
The multi-worker path has no per-epoch validation (`val_*`): the chief
evaluates once at the end. Only its chief writes into model_dir.

Resume: with `config.resume` (the default) a run restarts from the last
completed epoch in its checkpoint directory; a finished run re-run trains
nothing and rewrites the final files. `resume=False` deletes the previous
checkpoints and log first.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from cgc_tf import backbones
from cgc_tf import callbacks as callbacks_lib
from cgc_tf import custom_loop
from cgc_tf import data
from cgc_tf import distribute
from cgc_tf import evaluation as evaluation_lib
from cgc_tf import explainers
from cgc_tf import model_dir as layout
from cgc_tf import optimizers
from cgc_tf import run_lock
from cgc_tf.schedules import LinearWarmup
from cgc_tf.augment import PairedAugmentation
from cgc_tf.model import CGCModel

# Explanation metrics printed at the end of a run (all are in metrics.json).
HEADLINE_METRICS = (
    "content_heatmap_percent",
    "consistency_cosine",
    "consistency_pearson",
    "insertion_auc",
    "deletion_auc",
)
HEATMAP_IMAGES = 8

# Fields that shape the model's and optimizer's variables: a checkpoint written
# with other values cannot be restored.
_CHECKPOINT_FIELDS = ("dataset", "arch", "image_size")
_JIT_COMPILE = {"auto": "auto", "true": True, "false": False}


class ConfigurationError(ValueError):
    """The configuration does not fit the model, the data or the model_dir."""


def learning_rate_schedule(config, steps_per_epoch):
    """The learning rate per optimizer step for `config`.

    step: x lr_decay_factor every lr_decay_epochs, or at each epoch of
    lr_decay_milestones (torch's MultiStepLR); cosine: to 0 over all epochs;
    constant. Then a linear warmup over warmup_epochs when > 0.

    Returns:
      A float or a keras LearningRateSchedule.
    """
    rate = float(config.learning_rate)
    total_steps = config.epochs * steps_per_epoch
    if config.lr_schedule == "cosine":
        schedule = keras.optimizers.schedules.CosineDecay(rate, decay_steps=total_steps)
    elif config.lr_schedule == "step":
        milestones = config.lr_decay_milestones or [
            k * config.lr_decay_epochs
            for k in range(1, math.ceil(config.epochs / config.lr_decay_epochs))
        ]
        # The optimizer evaluates the schedule at its iteration count before the
        # step, and PiecewiseConstantDecay switches after step > boundary: "- 1"
        # makes the first step of a milestone epoch use the decayed rate.
        boundaries = [
            epoch * steps_per_epoch - 1 for epoch in milestones if epoch < config.epochs
        ]
        values = [rate * config.lr_decay_factor**k for k in range(len(boundaries) + 1)]
        schedule = (
            keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
            if boundaries
            else rate
        )
    else:
        schedule = rate
    if config.warmup_epochs > 0:
        schedule = LinearWarmup(schedule, config.warmup_epochs * steps_per_epoch)
    return schedule


def build_strategy(config):
    """The tf.distribute strategy of `config`: the one place training makes a strategy."""
    return distribute.strategy_from_name(config.strategy, tpu=config.tpu)


def _layer_is_4d(layer):
    try:
        return len(layer.output.shape) == 4
    except (AttributeError, ValueError):
        return False


def check_target_layer(backbone, target_layer):
    """Raises ConfigurationError unless `target_layer` is a 4-D layer of `backbone`."""
    candidates = [layer.name for layer in backbone.layers if _layer_is_4d(layer)]
    names = [layer.name for layer in backbone.layers]
    if target_layer not in names:
        raise ConfigurationError(
            f"target_layer={target_layer!r} is not a layer of {backbone.name!r}; layers with "
            f"4-D outputs (valid targets, last 12) are {candidates[-12:]}"
        )
    if target_layer not in candidates:
        shape = tuple(backbone.get_layer(target_layer).output.shape)
        raise ConfigurationError(
            f"target_layer={target_layer!r} has output shape {shape}, not 4-D [B, h, w, k]; "
            f"layers with 4-D outputs (last 12) are {candidates[-12:]}"
        )


def _layers_left_at_initialisation(backbone, reference):
    """Names of layers with weights whose values all equal the same-seed reference."""
    unchanged = []
    for layer, reference_layer in zip(backbone.layers, reference.layers):
        weights = layer.get_weights()
        if weights and all(
            a.shape == b.shape and np.array_equal(a, b)
            for a, b in zip(weights, reference_layer.get_weights())
        ):
            unchanged.append(layer.name)
    return unchanged


def build_backbone(config, num_classes, say=print):
    """The backbone of `config` with its init_weights; returns (backbone, target_layer).

    Layers of init_weights whose shapes differ (the classifier head when
    num_classes differs, as in fine-tuning) keep their random initialisation
    and are reported through `say`.

    Raises:
      ConfigurationError: if init_weights fits no layer, or the target layer is
        not a 4-D layer of the backbone.
    """
    input_shape = (config.image_size, config.image_size, 3)
    keras.utils.set_random_seed(config.seed)
    with warnings.catch_warnings():
        # Keras warns about every skipped layer; the summary below says it once.
        warnings.simplefilter("ignore", UserWarning)
        backbone, recommended = backbones.build(
            config.arch, input_shape, num_classes, weights=config.init_weights,
            synchronized_batch_norm=config.synchronized_batch_norm,
        )
    if config.init_weights is not None:
        # A same-seed build without weights tells which layers the file did not fill.
        keras.utils.set_random_seed(config.seed)
        reference, _ = backbones.build(config.arch, input_shape, num_classes)
        unchanged = _layers_left_at_initialisation(backbone, reference)
        with_weights = [layer.name for layer in backbone.layers if layer.get_weights()]
        if len(unchanged) == len(with_weights):
            raise ConfigurationError(
                f"init_weights={config.init_weights!r} matched no layer of arch={config.arch!r} "
                f"with num_classes={num_classes}; is it a weights file of this architecture?"
            )
        if unchanged:
            say(
                f"init_weights: {len(unchanged)} layer(s) did not match the file (e.g. a "
                f"classifier head for another num_classes than {num_classes}) and start from "
                f"random initialisation: {unchanged}"
            )
    target_layer = config.target_layer or recommended or explainers.auto_target_layer(backbone)
    check_target_layer(backbone, target_layer)
    return backbone, target_layer


def _check_replicas(config, strategy):
    replicas = strategy.num_replicas_in_sync
    errors = []
    if config.batch_size % replicas:
        errors.append(
            f"batch_size={config.batch_size} (global) must be divisible by the "
            f"{replicas} replicas of strategy={config.strategy!r}"
        )
    elif config.consistency == "contrastive" and config.batch_size // replicas < 2:
        errors.append(
            f"batch_size={config.batch_size} gives {config.batch_size // replicas} image(s) per "
            f"replica on {replicas} replicas; consistency='contrastive' needs >= 2 per replica"
        )
    if config.jit_compile == "true" and replicas > 1 and config.strategy != "tpu":
        errors.append(
            f"jit_compile='true' compiles the train step for one device, which cannot reach the "
            f"variables of the {replicas} replicas of strategy={config.strategy!r}; use "
            "jit_compile='auto' (no XLA under tf.distribute) or 'false'"
        )
    if errors:
        raise ConfigurationError("\n".join(errors))


def _check_resumable(config, model_dir, say):
    """Refuses to resume a checkpoint written for a different model or training path."""
    # The metadata is written first: a kill before latest.weights.h5 appears
    # still leaves a fit checkpoint whose config must be checked.
    fit_state = any(
        os.path.exists(os.path.join(model_dir, layout.BACKUP_DIR, name))
        for name in ("latest.weights.h5", callbacks_lib.PreemptibleBackupAndRestore.METADATA_FILE)
    )
    multi_worker_dir = os.path.join(model_dir, layout.MULTI_WORKER_DIR)
    multi_worker_state = custom_loop.completed_epochs(multi_worker_dir) > 0
    if config.strategy == "multi_worker" and fit_state and not multi_worker_state:
        raise ConfigurationError(
            f"model_dir={model_dir!r} holds the checkpoint of a Keras fit run "
            f"({layout.BACKUP_DIR}/), which strategy='multi_worker' cannot resume; resume it "
            "with the strategy it was started with, or use another model_dir or resume=False "
            "(--noresume) to start over"
        )
    if config.strategy != "multi_worker" and multi_worker_state and not fit_state:
        raise ConfigurationError(
            f"model_dir={model_dir!r} holds the checkpoint of a strategy='multi_worker' run "
            f"({layout.MULTI_WORKER_DIR}/), which strategy={config.strategy!r} cannot resume; "
            "resume it with strategy='multi_worker', or use another model_dir or resume=False "
            "(--noresume) to start over"
        )
    path = os.path.join(model_dir, layout.CONFIG_FILE)
    if not ((fit_state or multi_worker_state) and os.path.exists(path)):
        return
    with open(path) as f:
        previous = json.load(f)
    changed = [
        f"{name}: {previous.get(name)!r} -> {getattr(config, name)!r}"
        for name in _CHECKPOINT_FIELDS
        if name in previous and previous[name] != getattr(config, name)
    ]
    # Variables are float32 under every policy; only mixed_float16 adds the loss
    # scale's optimizer variables (LossScaleOptimizer).
    float16 = "mixed_float16"
    if "mixed_precision" in previous and (
        (previous["mixed_precision"] == float16) != (config.mixed_precision == float16)
    ):
        changed.append(
            f"mixed_precision: {previous['mixed_precision']!r} -> {config.mixed_precision!r}"
        )
    if changed:
        raise ConfigurationError(
            f"model_dir={model_dir!r} holds a checkpoint of a different model "
            f"({'; '.join(changed)}); use another model_dir or resume=False (--noresume) "
            "to start over"
        )
    other = [
        name
        for name, value in dataclasses.asdict(config).items()
        if name in previous and previous[name] != value and name not in ("epochs", "resume")
    ]
    if other:
        say(f"Resuming with changed settings: {other}")


def _reset_model_dir(model_dir):
    """resume=False: removes checkpoints and the log of an earlier run."""
    shutil.rmtree(os.path.join(model_dir, layout.CHECKPOINT_DIR), ignore_errors=True)
    log = os.path.join(model_dir, layout.LOG_FILE)
    if os.path.exists(log):
        os.remove(log)


def _steps_per_epoch(config, info):
    """Optimizer steps per epoch: config.steps_per_epoch or the labelled batches per pass."""
    if config.steps_per_epoch is not None:
        return config.steps_per_epoch
    if config.examples_per_class is not None:
        examples = config.examples_per_class * info.num_classes
    else:
        examples = info.splits[info.train_split]
    return max(1, examples // config.batch_size)


def _heatmap_images(eval_data, count):
    """The first `count` eval images, float32 [N, S, S, 3]."""
    images = []
    for batch in eval_data:
        x = batch[0]
        if isinstance(x, dict):
            x = x["image"]
        images.append(x.numpy())
        if sum(len(i) for i in images) >= count:
            break
    return np.concatenate(images)[:count]


def _train_dataset(config, batch_size, completed_epochs, counter, num_shards=1, shard_index=0,
                   input_stats=None):
    """One pass of training batches of `batch_size`; semi-supervised with config.unlabeled.

    With `num_shards` > 1 only shard `shard_index` of the records is read and
    decoded (`data.train_dataset`); `input_stats` counts the decoded images.
    """
    sharding = {"num_shards": num_shards, "shard_index": shard_index, "input_stats": input_stats}
    # Shifting the seed by the completed epochs keeps a resumed run from
    # replaying the shuffling order of the first epochs; the labelled subset
    # keeps config.seed (subset_seed), so a resumed run trains on the same examples.
    seed = config.seed + completed_epochs
    corrupt = {"skip_corrupt_images": config.skip_corrupt_images, "corrupt_image_counter": counter}
    train = data.train_dataset(
        config.dataset,
        batch_size,
        config.image_size,
        data_dir=config.data_dir,
        examples_per_class=config.examples_per_class,
        seed=seed,
        classification_view=config.views == 3,
        drop_remainder=True,
        subset_seed=config.seed,
        **corrupt,
        **sharding,
    )
    if config.unlabeled is not None:
        unlabeled = data.unlabeled_dataset(
            config.unlabeled,
            batch_size,
            config.image_size,
            data_dir=config.data_dir,
            split=config.unlabeled_split,
            seed=seed,
            **corrupt,
            **sharding,
        )
        train = data.semi_supervised_dataset(train, unlabeled)
    return train


def _eval_dataset(config, counter):
    return data.eval_dataset(
        config.dataset,
        config.batch_size,
        config.image_size,
        data_dir=config.data_dir,
        skip_corrupt_images=config.skip_corrupt_images,
        corrupt_image_counter=counter,
    )


def _multi_worker_dataset_fn(config, counter, input_stats):
    """dataset_fn for `custom_loop.train`: one epoch of this worker's share of the records."""

    def dataset_fn(input_context, epoch):
        # The seed of epoch e is config.seed + e, as for the first epoch of a
        # fit run resumed after e epochs; the loop rebuilds the dataset every
        # epoch, so a resumed run sees the batches of an uninterrupted one.
        batches = _train_dataset(
            config,
            input_context.get_per_replica_batch_size(config.batch_size),
            epoch,
            counter,
            num_shards=input_context.num_input_pipelines,
            shard_index=input_context.input_pipeline_id,
            input_stats=input_stats,
        )
        # The records are already sharded before decoding; tf.data's auto-shard
        # (which distribute_datasets_from_function does not apply, but an
        # experimental_distribute_dataset of this dataset would) must not split
        # this worker's share again.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF
        )
        return batches.repeat().with_options(options)

    return dataset_fn


class _InputStatsWriter(keras.callbacks.Callback):
    """Writes model_dir/input_stats/worker-<index>.json after every epoch and at the end."""

    def __init__(self, model_dir, input_stats):
        super().__init__()
        self._model_dir = model_dir
        self._input_stats = input_stats
        self._epochs = 0

    def _write(self):
        values = dict(self._input_stats.as_dict(), epochs_this_run=self._epochs)
        path = layout.input_stats_file(self._input_stats.shard_index)
        layout.write_json(os.path.join(self._model_dir, path), values)

    def on_epoch_end(self, epoch, logs=None):
        self._epochs += 1
        self._write()

    def on_train_end(self, logs=None):
        self._write()


def _final_metrics(model, config, info, progress=False):
    """Final evaluation written to metrics.json; the explanation metrics hook in here.

    Args:
      model: the trained CGCModel.
      config: the TrainConfig.
      info: the data.DatasetInfo of config.dataset.
      progress: bool, print the explanation metrics' progress lines.

    Returns:
      dict of JSON-serialisable values: accuracy (top-1 on info.eval_split, in
      [0, 1]), ce_loss, cgc_loss (under a random T; not for the plain
      baseline) and the split name.
    """
    # One pipeline serves both evaluations: with boxes it yields dicts, which
    # model.evaluate needs as (x, y).
    evaluation = data.eval_dataset(
        config.dataset,
        config.batch_size,
        config.image_size,
        data_dir=config.data_dir,
        with_boxes=info.has_bounding_boxes,
        skip_corrupt_images=config.skip_corrupt_images,
    )
    labelled = evaluation
    if info.has_bounding_boxes:
        labelled = evaluation.map(lambda batch: ({"image": batch["image"]}, batch["label"]))
    results = model.evaluate(labelled, verbose=0, return_dict=True)
    metrics = {
        "eval_split": info.eval_split,
        "accuracy": float(results["accuracy"]),
        "ce_loss": float(results["ce_loss"]),
    }
    if "cgc_loss" in results:  # Not for the plain baseline (consistency="none").
        metrics["cgc_loss"] = float(results["cgc_loss"])
    # Explanation metrics cost ~30 forward passes per image (insertion/deletion);
    # a run shortened by steps_per_epoch gets an evaluation shortened alike.
    max_images = None if config.steps_per_epoch is None else config.batch_size * config.steps_per_epoch
    # For progress lines only (skipped corrupt images may make it smaller).
    dataset_size = info.splits.get(info.eval_split) or None
    explanation = evaluation_lib.evaluate_model(
        model, evaluation, augmentation_seed=config.seed, progress=progress,
        max_images=max_images, dataset_size=dataset_size,
    )
    metrics["explanations"] = {
        key: value for key, value in explanation.items() if not key.endswith("_count")
    }
    # consistency_* above draws T from the paper's crop areas (0.08-1); this run
    # trained with T from [transform_min_area, 1], so report that one beside it.
    training_t = evaluation_lib.evaluate_consistency(
        {"model": model}, evaluation,
        PairedAugmentation(area_range=(config.transform_min_area, 1.0)),
        augmentation_seed=config.seed, max_images=max_images, progress=progress,
        dataset_size=dataset_size,
    )["model"]
    metrics["explanations"]["consistency_cosine_training_transforms"] = training_t[
        "consistency_cosine"
    ]
    metrics["explanations"]["consistency_pearson_training_transforms"] = training_t[
        "consistency_pearson"
    ]
    metrics["protocol"] = evaluation_lib.PROTOCOL
    metrics["consistency_transform_areas"] = {
        "paper": [0.08, 1.0], "training": [config.transform_min_area, 1.0]
    }
    return metrics


def _suggestions(config):
    causes = [
        f"learning rate too high (learning_rate={config.learning_rate}); try a 3-10x "
        "smaller one or warmup_epochs >= 1"
    ]
    if config.mixed_precision == "mixed_float16":
        causes.append(
            "mixed_float16 overflow: the dynamic loss scale could not keep up; try "
            "mixed_bfloat16 or none"
        )
    if config.consistency == "contrastive":
        causes.append(
            f"temperature={config.temperature} too small for the consistency logits"
        )
    return causes


def run_training(config, progress=True, callbacks=()):
    """Trains a CGCModel as `config` says, resuming from model_dir, and evaluates it.

    With strategy='multi_worker' every worker of the cluster calls this with the
    same config; only the chief writes into model_dir (docs/distributed.md).

    Args:
      config: a TrainConfig (validated here).
      progress: print progress bars and where the outputs went (on the chief).
      callbacks: extra keras callbacks, run after the built-in ones: for `fit`,
        or with strategy='multi_worker' for `custom_loop.train` on every worker
        (per-epoch logs, averaged over all replicas; no `val_*` keys).

    Returns:
      dict: the final metrics (also in model_dir/metrics.json); None on the
      non-chief workers of strategy='multi_worker'.

    Raises:
      ValueError: invalid configuration (ConfigurationError after model checks);
        run_lock.ModelDirInUseError when another process trains in model_dir.
      callbacks_lib.NonFiniteLossError: a loss became NaN/inf; the last good
        checkpoint is left intact.
      callbacks_lib.TrainingPreempted: SIGTERM (with strategy='multi_worker': to
        any worker); a checkpoint was saved, from which a re-run resumes.
    """
    config.validate()
    # Before TensorFlow runs any op: MultiWorkerMirroredStrategy configures the
    # runtime's collective ops when it is created.
    strategy = build_strategy(config)
    multi_worker = config.strategy == "multi_worker"
    chief = distribute.is_chief(strategy)
    say = print if progress and chief else _silent
    # Only the chief writes model_dir (the other multi-worker workers may share it).
    with run_lock.hold(config.model_dir) if chief else contextlib.nullcontext():
        return _run_locked(config, strategy, multi_worker, chief, say, progress, callbacks)


def _run_locked(config, strategy, multi_worker, chief, say, progress, callbacks):
    """run_training once the chief holds the model_dir lock."""
    model_dir = config.model_dir
    if config.resume:
        _check_resumable(config, model_dir, say)
    elif chief:
        _reset_model_dir(model_dir)
    if chief:
        # Builds the embedded dataset on first use: once, before any other
        # worker reads it from a shared data_dir.
        info = _dataset_info(config)
    if multi_worker:
        # No worker reads the checkpoints or the data before the chief has reset
        # and prepared them.
        custom_loop.barrier(strategy)
    if not chief:
        info = _dataset_info(config)
    if multi_worker:
        resume_dir = os.path.join(model_dir, layout.MULTI_WORKER_DIR)
        completed = custom_loop.completed_epochs(resume_dir)
    else:
        resume_dir = os.path.join(model_dir, layout.BACKUP_DIR)
        completed = callbacks_lib.PreemptibleBackupAndRestore.completed_epochs(resume_dir)
    if completed:
        say(f"Resuming from {resume_dir}: {completed} of {config.epochs} epochs done")
    _check_labelled_subset(config, completed, write=chief)
    if chief:
        callbacks_lib.truncate_csv_log(os.path.join(model_dir, layout.LOG_FILE), completed)
        layout.write_json(os.path.join(model_dir, layout.CONFIG_FILE), dataclasses.asdict(config))

    previous_policy = keras.mixed_precision.global_policy()
    policy, reason = distribute.resolve_mixed_precision(config.mixed_precision, config.strategy)
    say(f"Precision: {policy} ({reason})")
    keras.mixed_precision.set_global_policy(policy)
    try:
        return _train(config, strategy, info, completed, say, progress, callbacks)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _check_labelled_subset(config, completed, write):
    """Writes model_dir/labelled_subset.json; a resumed run must draw the same subset.

    Only with examples_per_class. The subset depends on the data,
    examples_per_class and seed only (the per-epoch seeds move the shuffling).

    Raises:
      ConfigurationError: a resumed run (completed > 0) whose subset differs from
        the file's, e.g. because the data changed since the run started.
    """
    if config.examples_per_class is None:
        return
    subset = data.labelled_subset(
        config.dataset, config.examples_per_class, config.seed, config.image_size,
        data_dir=config.data_dir,
    )
    record = {
        "dataset": config.dataset,
        "split": subset["split"],
        "seed": config.seed,
        "examples_per_class": config.examples_per_class,
        "examples": subset["examples"],
    }
    path = os.path.join(config.model_dir, layout.LABELLED_SUBSET_FILE)
    if completed and os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous == record:
            return
        changed = [key for key in record if previous.get(key) != record[key]]
        classes = sorted(
            name
            for name in set(record["examples"]) | set(previous.get("examples", {}))
            if previous.get("examples", {}).get(name) != record["examples"].get(name)
        )
        raise ConfigurationError(
            f"model_dir={config.model_dir!r} holds a run started on another labelled subset "
            f"than this run draws ({path}: {', '.join(changed)} differ; classes with other "
            f"examples: {classes[:5]}{' ...' if len(classes) > 5 else ''}). Resuming would "
            "train on other examples: restore the data (or seed, examples_per_class) the run "
            "started with, or use another model_dir or resume=False (--noresume) to start over"
        )
    if write:
        layout.write_json(path, record)


def _silent(*args, **kwargs):
    del args, kwargs


def _dataset_info(config):
    return data.dataset_info(config.dataset, data_dir=config.data_dir, image_size=config.image_size)


def _build_model(config, num_classes, steps_per_epoch, strategy, say):
    """The compiled CGCModel of `config`, its variables and optimizer created under `strategy`."""
    with strategy.scope():
        backbone, target_layer = build_backbone(config, num_classes, say)
        model = CGCModel(
            backbone,
            target_layer=target_layer,
            lambda_=config.lambda_,
            temperature=config.temperature,
            consistency=config.consistency,
            views=config.views,
            # T as the reference draws and resamples it (integer crops, torch's bilinear).
            augmentation=PairedAugmentation(
                area_range=(config.transform_min_area, 1.0), crop_mode="torchvision"
            ),
            global_negatives=config.global_negatives,
        )
        model(tf.zeros((1, config.image_size, config.image_size, 3)))
        optimizer = optimizers.sgd(
            learning_rate_schedule(config, steps_per_epoch),
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            weight_decay_mode=config.weight_decay_mode,
        )
        model.compile(
            optimizer=optimizer, metrics=["accuracy"], jit_compile=_JIT_COMPILE[config.jit_compile]
        )
    return model


def _stop_on_non_finite_loss(config, checkpoint_dir):
    return callbacks_lib.StopOnNonFiniteLoss(
        checkpoint_description=(
            f"The last good state (end of the last completed epoch) is in "
            f"{os.path.join(config.model_dir, checkpoint_dir)}; fix the cause and re-run to "
            "resume from it."
        ),
        suggestions=_suggestions(config),
    )


def _summaries(config, eval_data):
    """TensorBoard callbacks: epoch scalars and Grad-CAM overlays of fixed eval images."""
    tensorboard_dir = os.path.join(config.model_dir, layout.TENSORBOARD_DIR)
    return [
        callbacks_lib.EpochSummaries(tensorboard_dir),
        callbacks_lib.HeatmapSummary(
            _heatmap_images(eval_data, HEATMAP_IMAGES),
            os.path.join(config.model_dir, layout.HEATMAPS_DIR),
            every=config.eval_every,
        ),
    ]


def _train(config, strategy, info, completed, say, progress, extra_callbacks):
    _check_replicas(config, strategy)
    chief = distribute.is_chief(strategy)
    counter = data.CorruptImageCounter() if config.skip_corrupt_images else None
    steps_per_epoch = _steps_per_epoch(config, info)
    model = _build_model(config, info.num_classes, steps_per_epoch, strategy, say)
    if config.strategy == "multi_worker":
        epochs_run, train_seconds = _train_multi_worker(
            config, strategy, model, steps_per_epoch, counter, progress, extra_callbacks
        )
    else:
        epochs_run, train_seconds = _fit(
            config, model, steps_per_epoch, completed, counter, progress, extra_callbacks
        )
    mixed = keras.mixed_precision.global_policy().name != "float32"
    if chief and (config.strategy == "multi_worker" or mixed):
        # Mixed precision is a training setting (the variables are float32 under
        # every policy): the saved, evaluated and exported model computes in
        # float32.
        keras.mixed_precision.set_global_policy("float32")
        model = _local_copy(model, config, info.num_classes, steps_per_epoch)
    metrics = None
    if chief:
        metrics = _write_final_files(config, model, info, epochs_run, train_seconds, counter, say)
    if config.strategy == "multi_worker":
        # The workers finish together: one that exits while the chief still
        # evaluates makes the chief's TensorFlow log "tasks have crashed".
        custom_loop.barrier(strategy)
    return metrics


def _fit(config, model, steps_per_epoch, completed, counter, progress, extra_callbacks):
    """Keras fit with BackupAndRestore; returns (epochs run, seconds)."""
    model_dir = config.model_dir
    # Repeated, with a fixed number of steps per epoch: the schedule needs the
    # count up front, and skipped corrupt images must not end an epoch early.
    input_stats = data.InputStats()
    train_data = _train_dataset(
        config, config.batch_size, completed, counter, input_stats=input_stats
    ).repeat()
    eval_data = _eval_dataset(config, counter)
    backup = callbacks_lib.PreemptibleBackupAndRestore(os.path.join(model_dir, layout.BACKUP_DIR))
    csv_logger = callbacks_lib.ResumableCSVLogger(
        os.path.join(model_dir, layout.LOG_FILE), append=completed > 0
    )
    # Order matters: the loggers run before the checkpoint, so a kill between the
    # two re-runs the epoch (and truncate_csv_log drops its first row) rather
    # than losing its row.
    fit_callbacks = [
        _stop_on_non_finite_loss(config, layout.CHECKPOINT_DIR),
        callbacks_lib.LearningRateLogger(),
        csv_logger,
        *_summaries(config, eval_data),
        callbacks_lib.AtomicModelCheckpoint(os.path.join(model_dir, layout.EPOCH_MODEL_FILE)),
        backup,
        _InputStatsWriter(model_dir, input_stats),
        *extra_callbacks,
    ]
    verbose = (1 if _is_interactive() else 2) if progress else 0
    start = time.monotonic()
    try:
        history = model.fit(
            train_data,
            epochs=config.epochs,
            steps_per_epoch=steps_per_epoch,
            validation_data=eval_data,
            validation_freq=config.eval_every,
            callbacks=fit_callbacks,
            verbose=verbose,
            shuffle=False,  # the pipeline shuffles
        )
    finally:
        backup.uninstall_signal_handler()
        csv_logger.on_train_end()
    return len(history.epoch), time.monotonic() - start


def _train_multi_worker(
    config, strategy, model, steps_per_epoch, counter, progress, extra_callbacks
):
    """custom_loop.train, on every worker; returns (epochs run, seconds)."""
    chief = distribute.is_chief(strategy)
    # Outside the strategy's scope: a plain counter variable of this worker.
    input_stats = data.InputStats()
    epoch_callbacks = [
        _stop_on_non_finite_loss(config, layout.MULTI_WORKER_DIR),
        callbacks_lib.LearningRateLogger(),
        # Every worker writes its own file (the one file a non-chief writes).
        _InputStatsWriter(config.model_dir, input_stats),
    ]
    if chief:
        # Chief only: HeatmapSummary's `explain` reads only this worker's copy
        # of the variables, so it starts no collective op.
        epoch_callbacks += _summaries(config, _eval_dataset(config, counter))
    start = time.monotonic()
    history = custom_loop.train(
        model,
        strategy,
        _multi_worker_dataset_fn(config, counter, input_stats),
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        checkpoint_dir=os.path.join(config.model_dir, layout.MULTI_WORKER_DIR),
        csv_path=os.path.join(config.model_dir, layout.LOG_FILE),
        callbacks=[*epoch_callbacks, *extra_callbacks],
        verbose=1 if progress else 0,
    )
    return len(history.epoch), time.monotonic() - start


def _local_copy(model, config, num_classes, steps_per_epoch):
    """`model` rebuilt outside its strategy, under the global dtype policy, with its
    weights and optimizer state.

    The chief saves and evaluates this copy: `evaluate` on the multi-worker model,
    or saving its metrics (sync-on-read variables), would start collective ops
    that the other workers never join. Reading weights and optimizer variables
    (mirrored) reads this worker's copy only. Built under float32, it is also
    the full-precision model of a mixed-precision run (whose LossScaleOptimizer's
    loss scale is not copied: the copy's optimizer is the inner SGD).
    """
    # init_weights=None: every weight is overwritten below.
    copy = _build_model(
        config.replace(init_weights=None),
        num_classes,
        steps_per_epoch,
        tf.distribute.get_strategy(),
        _silent,
    )
    copy.set_weights(model.get_weights())
    copy.optimizer.build(copy.trainable_variables)
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    for target, source in zip(copy.optimizer.variables, optimizer.variables, strict=True):
        target.assign(source.numpy())
    return copy


def _write_final_files(config, model, info, epochs_run, train_seconds, counter, say):
    """Saves model.keras, evaluates into metrics.json, rewrites config.json; returns the metrics."""
    model_dir = config.model_dir
    model_path = os.path.join(model_dir, layout.MODEL_FILE)
    with layout.atomic_write_path(model_path) as temporary_path:
        model.save(temporary_path)
    backbone_path = os.path.join(model_dir, layout.BACKBONE_WEIGHTS_FILE)
    with layout.atomic_write_path(backbone_path) as temporary_path:
        model.backbone.save_weights(temporary_path)
    layout.write_json(os.path.join(model_dir, layout.CONFIG_FILE), dataclasses.asdict(config))
    metrics = _final_metrics(model, config, info, progress=say is not _silent)
    metrics["epochs"] = config.epochs
    metrics["epochs_run_this_time"] = epochs_run
    if epochs_run:
        metrics["mean_epoch_seconds_this_time"] = train_seconds / epochs_run
    skipped = None if counter is None else counter.count
    if skipped is not None:
        metrics["skipped_corrupt_images"] = skipped
    layout.write_json(os.path.join(model_dir, layout.METRICS_FILE), metrics)

    say(f"Trained {config.epochs} epochs ({epochs_run} in this run, {train_seconds:.0f} s).")
    if skipped:
        say(f"Skipped {skipped} corrupt image(s) while reading {config.dataset!r}.")
    say(f"{info.eval_split} accuracy: {metrics['accuracy']:.4f}")
    for key in HEADLINE_METRICS:
        value = metrics["explanations"].get(key)
        if value is not None:
            say(f"{info.eval_split} {key}: {value:.4f}")
    say(f"Outputs in {os.path.abspath(model_dir)}:")
    say(f"  {layout.MODEL_FILE} (final model), {layout.BACKBONE_WEIGHTS_FILE} "
        f"(for --init_weights), {layout.CONFIG_FILE}, {layout.METRICS_FILE}, {layout.LOG_FILE}")
    say(f"  {layout.CHECKPOINT_DIR}/ (resume state), {layout.TENSORBOARD_DIR}/ "
        "(tensorboard --logdir)")
    return metrics


def _is_interactive():
    return sys.stdout.isatty()
