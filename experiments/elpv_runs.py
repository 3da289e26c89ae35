"""The runs behind experiments/elpv.py: commands, the run plan, metrics, grids.

No flags (the script owns those), so tests import this module. See elpv.py for
the regimes, methods and outputs.
"""

import json
import os

import numpy as np

from cgc_tf import config as config_lib
from cgc_tf import data
from cgc_tf import evaluation
from cgc_tf import model_dir as layout
from experiments import runs as runs_lib

REPO = runs_lib.REPO

FLAGFILES = {
    "full": "elpv.cfg",
    "limited": "elpv_limited.cfg",
    "limited_pretrained": "elpv_limited.cfg",
    "semi": "elpv_semi.cfg",
    "semi_pretrained": "elpv_semi.cfg",
}
DEFAULT_REGIMES = ("full", "limited", "limited_pretrained", "semi")
PRETRAINED = ("limited_pretrained", "semi_pretrained")
LABELLED_SUBSET = ("limited", "limited_pretrained", "semi", "semi_pretrained")
SEMI = ("semi", "semi_pretrained")
# Where the plain baseline's rows of the semi regimes come from (see `plan`).
SEMI_WITHOUT_UNLABELLED = {"semi": "limited", "semi_pretrained": "limited_pretrained"}
# The reference's baselines, as the digits experiments run them (runs.METHODS).
METHODS = {name: runs_lib.METHODS[name] for name in runs_lib.PAPER_METHODS}
PRETRAIN_METHOD = "plain"
PRETRAIN_SEED = 0
PRETRAIN_REGIME = "pretrain"
# The pretraining run is reported on its own (poly) test cells: another row.
PRETRAIN_ROW = "pretrain (poly test)"
_DIGITS_COLUMNS = {column[0]: column for column in runs_lib.COLUMNS}
# The digits table's columns (runs.COLUMNS) without CH and the pointing game (elpv has
# no boxes), with balanced accuracy (the classes are imbalanced) and the training time.
COLUMNS = (
    _DIGITS_COLUMNS["accuracy"],
    ("balanced_accuracy", "balanced acc. %", 100.0),
    _DIGITS_COLUMNS["insertion_auc"],
    _DIGITS_COLUMNS["deletion_auc"],
    _DIGITS_COLUMNS["consistency_cosine"],
    _DIGITS_COLUMNS["consistency_pearson"],
    ("train_minutes", "train min", 1.0),
)
GRID_METHODS = ("plain", "cgc")


def regime_name(regime, labels_per_class):
    """The directory and table name of a regime: limited/semi ones carry their N."""
    return f"{regime}_n{labels_per_class}" if regime in LABELLED_SUBSET else regime


def pretrain_dir(output_dir):
    """The pretraining run's directory."""
    return runs_lib.run_dir(output_dir, PRETRAIN_REGIME, PRETRAIN_METHOD, PRETRAIN_SEED)


def pretrained_weights(output_dir):
    """The backbone weights the *_pretrained runs start from."""
    return os.path.join(pretrain_dir(output_dir), layout.BACKBONE_WEIGHTS_FILE)


def _dataset(cell_type, holdout):
    return f"elpv_{cell_type}" + ("_holdout" if holdout else "")


def pretrain_command(output_dir, extra=(), holdout=False):
    """The cgc-train command of the pretraining run (list of str)."""
    return [
        *runs_lib.base_command(
            FLAGFILES["full"], METHODS[PRETRAIN_METHOD], PRETRAIN_SEED, pretrain_dir(output_dir)
        ),
        f"--dataset={_dataset('poly', holdout)}",
        *extra,
    ]


def train_command(regime, method, seed, model_dir, output_dir, labels_per_class=30, extra=(),
                  holdout=False):
    """The cgc-train command of one run on the mono cells (list of str).

    Args:
      regime: a key of FLAGFILES.
      method: a key of METHODS.
      seed: int.
      model_dir: str, the run's directory.
      output_dir: str, the experiment's directory (where the pretraining run is).
      labels_per_class: int N of the limited and semi regimes.
      extra: more flags, last (they win).
      holdout: train on elpv_mono_holdout and report on its validation cells.
    """
    data_flags = [f"--dataset={_dataset('mono', holdout)}"]
    if regime in LABELLED_SUBSET:
        data_flags.append(f"--examples_per_class={labels_per_class}")
    if regime in SEMI:
        data_flags.append(f"--unlabeled={_dataset('mono', holdout)}")
    if regime in PRETRAINED:
        data_flags.append(f"--init_weights={pretrained_weights(output_dir)}")
    return [
        *runs_lib.base_command(FLAGFILES[regime], METHODS[method], seed, model_dir),
        *data_flags, *extra,
    ]


def plan(output_dir, regimes, methods, seeds, labels_per_class, extra=(), holdout=False):
    """Every run of the table: (pretraining runs, other runs), each a list of
    (regime name, method, seed, command, model_dir); the pretraining list is
    empty unless a *_pretrained regime is asked for.

    The plain baseline has no consistency term to give the unlabelled cells to,
    so its row of a semi regime is the plain run of the matching limited regime
    (the same labelled cells and seed): same command and model_dir, run once.
    """
    pretraining = []
    if any(regime in PRETRAINED for regime in regimes):
        pretraining.append((PRETRAIN_ROW, PRETRAIN_METHOD, PRETRAIN_SEED,
                            pretrain_command(output_dir, extra, holdout), pretrain_dir(output_dir)))
    others = []
    for regime in regimes:
        counts = labels_per_class if regime in LABELLED_SUBSET else [None]
        for count in counts:
            name = regime_name(regime, count)
            for seed in seeds:
                for method in methods:
                    run_regime = regime
                    if regime in SEMI and method == "plain":
                        run_regime = SEMI_WITHOUT_UNLABELLED[regime]
                    model_dir = runs_lib.run_dir(
                        output_dir, regime_name(run_regime, count), method, seed
                    )
                    command = train_command(run_regime, method, seed, model_dir, output_dir,
                                            count, extra, holdout)
                    others.append((name, method, seed, command, model_dir))
    return pretraining, others


def read_metrics(model_dir):
    """`runs.read_metrics` plus train_minutes (epochs x mean epoch time); None if unfinished."""
    metrics = runs_lib.read_metrics(model_dir)
    if metrics is None:
        return None
    with open(os.path.join(model_dir, runs_lib.METRICS_FILE)) as f:
        raw = json.load(f)
    seconds = raw.get("mean_epoch_seconds_this_time")
    metrics["train_minutes"] = None if seconds is None else seconds * raw["epochs"] / 60.0
    return metrics


def grid_cells(dataset, image_size, count, data_dir=None):
    """The first count/2 defective and count - count/2 functional cells of the eval split.

    Returns:
      (images float32 [count, S, S, 3], labels int32 [count]), in stored order.
    """
    wanted = {1: count // 2, 0: count - count // 2}
    images, labels = [], []
    for batch_images, batch_labels in data.eval_dataset(dataset, 64, image_size, data_dir=data_dir):
        for image, label in zip(batch_images["image"].numpy(), batch_labels.numpy()):
            if wanted.get(int(label), 0) > 0:
                wanted[int(label)] -= 1
                images.append(image)
                labels.append(int(label))
        if not any(wanted.values()):
            break
    return np.stack(images), np.asarray(labels, np.int32)


def write_grid(path, run_dirs, seed, count=6):
    """Grad-CAM of the same eval cells (and the same T) for every run in `run_dirs`.

    Args:
      path: output PNG.
      run_dirs: dict method -> finished run directory (same dataset and image size).
      seed: int, seeds T.
      count: int >= 2, cells (rows), half of them defective.
    """
    with open(os.path.join(next(iter(run_dirs.values())), runs_lib.CONFIG_FILE)) as f:
        config = config_lib.TrainConfig.from_json(f.read())
    images, labels = grid_cells(config.dataset, config.image_size, count, config.data_dir)
    models = {method: evaluation.load_model(run_dir) for method, run_dir in run_dirs.items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return evaluation.save_grid(path, models, images, labels, augmentation_seed=seed)
