"""The checks a training run makes before it trains, and where it resumes from.

`check_replicas` (the batch splits over the replicas), `check_resumable` (the
model_dir's checkpoint fits this config and training path), `completed_epochs`,
`reset_model_dir` (resume=False) and `check_labelled_subset` (a resumed run
trains on the examples it started with). Why a module: each refuses a run with
a readable `ConfigurationError` before any expensive step; docs/robustness.md
describes resuming.
"""

import dataclasses
import json
import os
import shutil

from cgc_tf import callbacks as callbacks_lib
from cgc_tf import custom_loop
from cgc_tf import data
from cgc_tf import model_dir as layout

# Fields that shape the model's and optimizer's variables: a checkpoint written
# with other values cannot be restored.
_CHECKPOINT_FIELDS = ("dataset", "arch", "image_size")


class ConfigurationError(ValueError):
    """The configuration does not fit the model, the data or the model_dir."""


def completed_epochs(model_dir, multi_worker):
    """(checkpoint directory, epochs it holds; 0 when none) of a run's training path.

    Args:
      model_dir: the run's directory.
      multi_worker: True for strategy='multi_worker' (custom_loop's checkpoint),
        False for Keras fit's.
    """
    if multi_worker:
        resume_dir = os.path.join(model_dir, layout.MULTI_WORKER_DIR)
        return resume_dir, custom_loop.completed_epochs(resume_dir)
    resume_dir = os.path.join(model_dir, layout.BACKUP_DIR)
    return resume_dir, callbacks_lib.PreemptibleBackupAndRestore.completed_epochs(resume_dir)


def check_replicas(config, strategy):
    """Raises ConfigurationError unless config.batch_size splits over the strategy's replicas."""
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


def check_resumable(config, multi_worker, say):
    """Refuses to resume a checkpoint written for a different model or training path.

    `multi_worker` is True for strategy='multi_worker'. Settings that change
    without changing the variables are reported through `say`.

    Raises:
      ConfigurationError: model_dir holds the checkpoint of another training path
        (fit vs. multi_worker) or of a model with other variables.
    """
    model_dir = config.model_dir
    # The metadata is written first: a kill before latest.weights.h5 appears
    # still leaves a fit checkpoint whose config must be checked.
    fit_state = any(
        os.path.exists(os.path.join(model_dir, layout.BACKUP_DIR, name))
        for name in ("latest.weights.h5", callbacks_lib.PreemptibleBackupAndRestore.METADATA_FILE)
    )
    multi_worker_dir = os.path.join(model_dir, layout.MULTI_WORKER_DIR)
    multi_worker_state = custom_loop.completed_epochs(multi_worker_dir) > 0
    if multi_worker and fit_state and not multi_worker_state:
        raise ConfigurationError(
            f"model_dir={model_dir!r} holds the checkpoint of a Keras fit run "
            f"({layout.BACKUP_DIR}/), which strategy='multi_worker' cannot resume; resume it "
            "with the strategy it was started with, or use another model_dir or resume=False "
            "(--noresume) to start over"
        )
    if not multi_worker and multi_worker_state and not fit_state:
        raise ConfigurationError(
            f"model_dir={model_dir!r} holds the checkpoint of a strategy='multi_worker' run "
            f"({layout.MULTI_WORKER_DIR}/), which strategy={config.strategy!r} cannot resume; "
            "resume it with strategy='multi_worker', or use another model_dir or resume=False "
            "(--noresume) to start over"
        )
    previous = layout.read_config(model_dir)
    if not ((fit_state or multi_worker_state) and previous):
        return
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


def reset_model_dir(model_dir):
    """resume=False: removes checkpoints and the log of an earlier run."""
    shutil.rmtree(os.path.join(model_dir, layout.CHECKPOINT_DIR), ignore_errors=True)
    log = os.path.join(model_dir, layout.LOG_FILE)
    if os.path.exists(log):
        os.remove(log)


def check_labelled_subset(config, completed, write):
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
