"""`run_training(config)`: data, CGCModel, SGD + schedule, training with resume, final files.

Two training paths drive the same `model.train_step`: Keras `fit` for every
strategy but 'multi_worker', and `cgc_tf.custom_loop.train` for 'multi_worker'
(Keras 3 `fit` does not support MultiWorkerMirroredStrategy). The files a run
writes are `cgc_tf.model_dir`'s; docs/training.md describes resuming and the two
paths.
"""

import contextlib
from collections.abc import Callable
import dataclasses
import math
import os
import sys
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from cgc_tf import backbones
from cgc_tf import callbacks as callbacks_lib
from cgc_tf import config as config_lib
from cgc_tf import custom_loop
from cgc_tf import data
from cgc_tf import distribute
from cgc_tf import evaluation as evaluation_lib
from cgc_tf import explainers
from cgc_tf import model_dir as layout
from cgc_tf import optimizers
from cgc_tf import run_lock
from cgc_tf import training_checks
from cgc_tf import training_input
from cgc_tf.schedules import LinearWarmup
from cgc_tf.augment import PairedAugmentation
from cgc_tf.model import CGCModel
from cgc_tf.training_checks import ConfigurationError

# Explanation metrics printed at the end of a run (all are in metrics.json).
HEADLINE_METRICS = (
    "content_heatmap_percent",
    "consistency_cosine",
    "consistency_pearson",
    "insertion_auc",
    "deletion_auc",
)
HEATMAP_IMAGES = 8

_JIT_COMPILE = {"auto": "auto", "true": True, "false": False}


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


@dataclasses.dataclass
class _Run:
    """What the steps of one `run_training` call share, decided once at its start."""

    config: config_lib.TrainConfig
    strategy: tf.distribute.Strategy
    # True for strategy='multi_worker': custom_loop.train instead of Keras fit.
    multi_worker: bool
    # This task writes model_dir: always, except on the multi-worker non-chiefs.
    chief: bool
    progress: bool
    # Prints on the chief with progress, else does nothing.
    say: Callable[..., None]
    # Extra keras callbacks, run after the built-in ones.
    callbacks: tuple
    # Set by _prepare: the dataset's splits and classes; epochs done before this call.
    info: data.DatasetInfo = None
    completed: int = 0
    # Counts skipped corrupt images (config.skip_corrupt_images), else None.
    counter: data.CorruptImageCounter = None

    def path(self, name):
        """`name` (a `cgc_tf.model_dir` name) inside this run's model_dir."""
        return os.path.join(self.config.model_dir, name)


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
    chief = distribute.is_chief(strategy)
    run = _Run(
        config=config,
        strategy=strategy,
        multi_worker=config.strategy == "multi_worker",
        chief=chief,
        progress=progress,
        say=print if progress and chief else _silent,
        callbacks=tuple(callbacks),
    )
    # Only the chief writes model_dir (the other multi-worker workers may share it).
    with run_lock.hold(config.model_dir) if chief else contextlib.nullcontext():
        _prepare(run)
        previous_policy = keras.mixed_precision.global_policy()
        policy, reason = distribute.resolve_mixed_precision(
            config.mixed_precision, config.strategy
        )
        run.say(f"Precision: {policy} ({reason})")
        keras.mixed_precision.set_global_policy(policy)
        try:
            return _train(run)
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)


def _prepare(run):
    """Checks or resets model_dir, reads the dataset, finds the epochs done (sets run.*)."""
    config = run.config
    if config.resume:
        training_checks.check_resumable(config, run.multi_worker, run.say)
    elif run.chief:
        training_checks.reset_model_dir(config.model_dir)
    if run.chief:
        # Builds the embedded dataset on first use: once, before any other
        # worker reads it from a shared data_dir.
        run.info = _dataset_info(config)
    if run.multi_worker:
        # No worker reads the checkpoints or the data before the chief has reset
        # and prepared them.
        custom_loop.barrier(run.strategy)
    if not run.chief:
        run.info = _dataset_info(config)
    resume_dir, run.completed = training_checks.completed_epochs(
        config.model_dir, run.multi_worker
    )
    if run.completed:
        run.say(f"Resuming from {resume_dir}: {run.completed} of {config.epochs} epochs done")
    training_checks.check_labelled_subset(config, run.completed, write=run.chief)
    if run.chief:
        callbacks_lib.truncate_csv_log(run.path(layout.LOG_FILE), run.completed)
        layout.write_json(run.path(layout.CONFIG_FILE), dataclasses.asdict(config))
    run.counter = data.CorruptImageCounter() if config.skip_corrupt_images else None


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
            training_input.heatmap_images(eval_data, HEATMAP_IMAGES),
            os.path.join(config.model_dir, layout.HEATMAPS_DIR),
            every=config.eval_every,
        ),
    ]


def _train(run):
    """Builds the model, trains it on this path and writes the final files on the chief."""
    training_checks.check_replicas(run.config, run.strategy)
    steps_per_epoch = training_input.steps_per_epoch(run.config, run.info)
    model = _build_model(
        run.config, run.info.num_classes, steps_per_epoch, run.strategy, run.say
    )
    train = _train_multi_worker if run.multi_worker else _fit
    epochs_run, train_seconds = train(run, model, steps_per_epoch)
    mixed = keras.mixed_precision.global_policy().name != "float32"
    if run.chief and (run.multi_worker or mixed):
        # Mixed precision is a training setting (the variables are float32 under
        # every policy): the saved, evaluated and exported model computes in
        # float32.
        keras.mixed_precision.set_global_policy("float32")
        model = _local_copy(model, run.config, run.info.num_classes, steps_per_epoch)
    metrics = None
    if run.chief:
        metrics = _write_final_files(run, model, epochs_run, train_seconds)
    if run.multi_worker:
        # The workers finish together: one that exits while the chief still
        # evaluates makes the chief's TensorFlow log "tasks have crashed".
        custom_loop.barrier(run.strategy)
    return metrics


def _fit(run, model, steps_per_epoch):
    """Keras fit with BackupAndRestore; returns (epochs run, seconds)."""
    config = run.config
    # Repeated, with a fixed number of steps per epoch: the schedule needs the
    # count up front, and skipped corrupt images must not end an epoch early.
    input_stats = data.InputStats()
    train_data = training_input.train_dataset(
        config, config.batch_size, run.completed, run.counter, input_stats=input_stats
    ).repeat()
    eval_data = training_input.eval_dataset(config, run.counter)
    backup = callbacks_lib.PreemptibleBackupAndRestore(run.path(layout.BACKUP_DIR))
    csv_logger = callbacks_lib.ResumableCSVLogger(
        run.path(layout.LOG_FILE), append=run.completed > 0
    )
    # Order matters: the loggers run before the checkpoint, so a kill between the
    # two re-runs the epoch (and truncate_csv_log drops its first row) rather
    # than losing its row.
    fit_callbacks = [
        _stop_on_non_finite_loss(config, layout.CHECKPOINT_DIR),
        callbacks_lib.LearningRateLogger(),
        csv_logger,
        *_summaries(config, eval_data),
        callbacks_lib.AtomicModelCheckpoint(run.path(layout.EPOCH_MODEL_FILE)),
        backup,
        training_input.InputStatsWriter(config.model_dir, input_stats),
        *run.callbacks,
    ]
    verbose = (1 if _is_interactive() else 2) if run.progress else 0
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


def _train_multi_worker(run, model, steps_per_epoch):
    """custom_loop.train, on every worker; returns (epochs run, seconds)."""
    config = run.config
    # Outside the strategy's scope: a plain counter variable of this worker.
    input_stats = data.InputStats()
    epoch_callbacks = [
        _stop_on_non_finite_loss(config, layout.MULTI_WORKER_DIR),
        callbacks_lib.LearningRateLogger(),
        # Every worker writes its own file (the one file a non-chief writes).
        training_input.InputStatsWriter(config.model_dir, input_stats),
    ]
    if run.chief:
        # Chief only: HeatmapSummary's `explain` reads only this worker's copy
        # of the variables, so it starts no collective op.
        epoch_callbacks += _summaries(config, training_input.eval_dataset(config, run.counter))
    start = time.monotonic()
    history = custom_loop.train(
        model,
        run.strategy,
        training_input.multi_worker_dataset_fn(config, run.counter, input_stats),
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        checkpoint_dir=run.path(layout.MULTI_WORKER_DIR),
        csv_path=run.path(layout.LOG_FILE),
        callbacks=[*epoch_callbacks, *run.callbacks],
        verbose=1 if run.progress else 0,
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


def _write_final_files(run, model, epochs_run, train_seconds):
    """Saves model.keras, evaluates into metrics.json, rewrites config.json; returns the metrics."""
    config, info, say = run.config, run.info, run.say
    with layout.atomic_write_path(run.path(layout.MODEL_FILE)) as temporary_path:
        model.save(temporary_path)
    with layout.atomic_write_path(run.path(layout.BACKBONE_WEIGHTS_FILE)) as temporary_path:
        model.backbone.save_weights(temporary_path)
    layout.write_json(run.path(layout.CONFIG_FILE), dataclasses.asdict(config))
    metrics = _final_metrics(model, config, info, progress=say is not _silent)
    metrics["epochs"] = config.epochs
    metrics["epochs_run_this_time"] = epochs_run
    if epochs_run:
        metrics["mean_epoch_seconds_this_time"] = train_seconds / epochs_run
    skipped = None if run.counter is None else run.counter.count
    if skipped is not None:
        metrics["skipped_corrupt_images"] = skipped
    layout.write_json(run.path(layout.METRICS_FILE), metrics)

    say(f"Trained {config.epochs} epochs ({epochs_run} in this run, {train_seconds:.0f} s).")
    if skipped:
        say(f"Skipped {skipped} corrupt image(s) while reading {config.dataset!r}.")
    say(f"{info.eval_split} accuracy: {metrics['accuracy']:.4f}")
    for key in HEADLINE_METRICS:
        value = metrics["explanations"].get(key)
        if value is not None:
            say(f"{info.eval_split} {key}: {value:.4f}")
    say(f"Outputs in {os.path.abspath(config.model_dir)}:")
    say(f"  {layout.MODEL_FILE} (final model), {layout.BACKBONE_WEIGHTS_FILE} "
        f"(for --init_weights), {layout.CONFIG_FILE}, {layout.METRICS_FILE}, {layout.LOG_FILE}")
    say(f"  {layout.CHECKPOINT_DIR}/ (resume state), {layout.TENSORBOARD_DIR}/ "
        "(tensorboard --logdir)")
    return metrics


def _is_interactive():
    return sys.stdout.isatty()
