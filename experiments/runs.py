"""The training runs behind experiments/reproduce.py and experiments/tune.py.

Commands of the training binary for a regime's flagfile, method and seed; a pool
that runs them (resumable: finished runs are skipped, unfinished ones resume);
their metrics; the untrained floor; mean +- std tables. No flags: the scripts own
those.
"""

import json
import os
import subprocess
import sys
import time

import keras
import numpy as np

from cgc_tf import config as config_lib
from cgc_tf import data
from cgc_tf import evaluation
from cgc_tf import model_dir as layout
from cgc_tf import training
# The model_dir names the runs are read by (one home: cgc_tf/model_dir.py).
from cgc_tf.model_dir import CONFIG_FILE
from cgc_tf.model_dir import METRICS_FILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILES = {
    "full": "cluttered_digits.cfg",
    "limited": "cluttered_digits_limited.cfg",
    "semi": "cluttered_digits_semi.cfg",
}
# Flags that turn the CGC flagfile into each method, as the reference scripts run
# them: plain = baseline_train_eval.py (one view, one cross-entropy); GC =
# train_eval_gc_l2_no_contrast_baseline.py at its default lambda 1000 (the MSE of
# two L2-normalised H*W maps is at most 4/(H*W): at CGC's lambda it does nothing);
# lambda0 = the lambda=0 ablation (CGC's multi-view step, no consistency gradient).
METHODS = {
    "plain": ["--consistency=none"],
    "gc": ["--consistency=mse", "--lambda_=1000"],
    "cgc": [],
    "lambda0": ["--lambda_=0"],
}
# The methods reproduce.py runs by default (the ablation on request).
PAPER_METHODS = ("plain", "gc", "cgc")
COLUMNS = (
    ("accuracy", "accuracy %", 100.0),
    ("content_heatmap_percent", "CH %", 1.0),
    ("insertion_auc", "insertion", 1.0),
    ("deletion_auc", "deletion", 1.0),
    ("consistency_cosine", "consistency cos", 1.0),
    ("consistency_pearson", "consistency r", 1.0),
    ("pointing_game", "pointing %", 100.0),
)
UNTRAINED = "untrained"
# The command line a run directory was started with (run_all).
COMMAND_FILE = "command.json"


def run_dir(output_dir, regime, method, seed):
    """Directory of one training run."""
    return os.path.join(output_dir, regime, f"{method}_seed{seed}")


def base_command(flagfile, method_flags, seed, model_dir):
    """The cgc-train command of one run without data flags (list of str).

    Args:
      flagfile: a file name in train/configs/.
      method_flags: the flags that make the method (a value of METHODS).
      seed: int.
      model_dir: the run's directory (no export: the experiments read metrics.json).
    """
    return [
        sys.executable, "-m", "train.main",
        "--flagfile=" + os.path.join(REPO, "train", "configs", flagfile),
        *method_flags,
        f"--seed={seed}",
        f"--model_dir={model_dir}",
        "--export=false",
    ]


def train_command(regime, method, seed, model_dir, extra=(), holdout=False):
    """The cgc-train command line of one run (list of str).

    With `holdout`, the run trains on `cluttered_digits_holdout` (and takes its
    unlabelled data from it in the semi regime), so it is evaluated on the
    validation digits, never on the test split. The plain baseline cannot use
    unlabelled images: its semi run is the limited regime's run (the semi
    flagfile is the limited one plus the unlabelled data).
    """
    uses_unlabelled = regime == "semi" and method != "plain"
    flagfile = FLAGFILES["limited" if regime == "semi" and not uses_unlabelled else regime]
    data_flags = []
    if holdout:
        data_flags = ["--dataset=cluttered_digits_holdout"]
        if uses_unlabelled:
            data_flags.append("--unlabeled=cluttered_digits_holdout")
    return [*base_command(flagfile, METHODS[method], seed, model_dir), *data_flags, *extra]


def read_metrics(model_dir):
    """The flat metrics of a finished run, or None when it has not finished."""
    path = os.path.join(model_dir, METRICS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        metrics = json.load(f)
    return {"accuracy": metrics["accuracy"], **metrics["explanations"]}


def untrained_floors(output_dir, seeds, config_path_for_seed):
    """Metrics of an untrained network per seed, cached in output_dir/untrained.json.

    Args:
      output_dir: the experiment's directory (holds untrained.json).
      seeds: ints.
      config_path_for_seed: seed -> the config.json of a finished run of that seed
        (the floor's network is built as that run's config says).

    Returns:
      dict seed -> flat metrics.
    """
    path = os.path.join(output_dir, "untrained.json")
    floors = {}
    if os.path.exists(path):
        with open(path) as f:
            floors = {int(k): v for k, v in json.load(f).items()}
    for seed in seeds:
        if seed not in floors:
            print(f"Evaluating an untrained network (seed {seed})", flush=True)
            floors[seed] = untrained_metrics(config_path_for_seed(seed), seed)
            layout.write_json(path, floors)
    return floors


def untrained_metrics(config_path, seed):
    """Metrics of an untrained network built as a finished run's config says.

    Args:
      config_path: a run's config.json (gives the dataset, arch, image size).
      seed: int, seeds the initial weights and the transforms T.

    Returns:
      dict metric -> float, the keys of `read_metrics`.
    """
    with open(config_path) as f:
        config = config_lib.TrainConfig.from_json(f.read())
    keras.utils.set_random_seed(seed)
    info = data.dataset_info(config.dataset, data_dir=config.data_dir, image_size=config.image_size)
    backbone, target_layer = training.build_backbone(config, info.num_classes, lambda *a: None)
    dataset = data.eval_dataset(
        config.dataset, config.batch_size, config.image_size, data_dir=config.data_dir,
        with_boxes=info.has_bounding_boxes,
    )
    results = evaluation.evaluate_model(
        evaluation.Explainer(backbone, target_layer), dataset, augmentation_seed=seed,
        progress=False,
    )
    return {key: value for key, value in results.items() if not key.endswith("_count")}


def summarize(runs, columns=COLUMNS):
    """Mean and sample standard deviation over seeds.

    Args:
      runs: list of dicts {"regime", "method", "seed", "metrics"}.
      columns: (metric, label, scale) triples; the metrics summarised.

    Returns:
      dict (regime, method) -> metric -> (mean, std, n).
    """
    grouped = {}
    for run in runs:
        grouped.setdefault((run["regime"], run["method"]), []).append(run["metrics"])
    summary = {}
    for key, metric_dicts in grouped.items():
        summary[key] = {}
        for metric, _, _ in columns:
            values = np.array([m[metric] for m in metric_dicts if m.get(metric) is not None])
            if values.size:
                std = float(values.std(ddof=1)) if values.size > 1 else 0.0
                summary[key][metric] = (float(values.mean()), std, int(values.size))
    return summary


def markdown_table(summary, regimes, methods, columns=COLUMNS):
    """The results table (docs/results.md): one row per regime and method, mean +- std over seeds.

    `columns` as in `summarize`: a scale of 100 prints a percentage with one decimal.
    """
    header = "| regime | method | seeds | " + " | ".join(label for _, label, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 3)]
    for regime in regimes:
        for method in [UNTRAINED] + list(methods):
            row = summary.get((regime, method))
            if row is None:
                continue
            seeds = max(n for _, _, n in row.values())
            cells = []
            for metric, _, scale in columns:
                if metric not in row:
                    cells.append("n/a")
                    continue
                mean, std, count = row[metric]
                digits = 1 if scale == 100.0 or metric == "content_heatmap_percent" else 3
                cell = f"{mean * scale:.{digits}f}"
                # One seed has no spread: no "± 0".
                cells.append(cell if count == 1 else f"{cell} ± {std * scale:.{digits}f}")
            lines.append(f"| {regime} | {method} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_same_command(command, model_dir, require_record=True):
    """Refuses a run directory started by another command line (its results would be stale).

    Args:
      command: the run's command (list of str; the interpreter, command[0], is ignored).
      model_dir: its directory; `run_all` records model_dir/command.json there.
      require_record: also refuse a started run (config.json exists) without
        command.json, e.g. one from before the method definitions changed.

    Raises:
      RuntimeError: naming the directory and both command lines.
    """
    path = os.path.join(model_dir, COMMAND_FILE)
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
    elif require_record and os.path.exists(os.path.join(model_dir, CONFIG_FILE)):
        recorded = None
    else:
        return
    if recorded != command[1:]:
        raise RuntimeError(
            f"{model_dir} holds a run of another command ({COMMAND_FILE}: {recorded}), not of "
            f"{command[1:]}: its results would not be this run's. Use another output "
            "directory, or delete that run directory to train it again"
        )


def run_all(runs, jobs, require_record=False):
    """Runs training commands, `jobs` at a time, skipping finished ones.

    Args:
      runs: list of (command, model_dir): a `train_command` and its --model_dir.
        A run whose metrics.json exists is skipped; an unfinished one resumes
        (the binary's own resume). Output goes to model_dir/train.log, the
        command to model_dir/command.json.
      jobs: int >= 1, runs at once.
      require_record: see `check_same_command`.

    Raises:
      RuntimeError: naming the log of the first run that failed, or a run
        directory of another command (`check_same_command`), before any run starts.
    """
    for command, model_dir in runs:
        check_same_command(command, model_dir, require_record)
    pending = [(command, model_dir) for command, model_dir in runs
               if read_metrics(model_dir) is None]
    total = len(runs)
    done = total - len(pending)
    print(f"{done} of {total} runs already finished; {len(pending)} to run.", flush=True)
    running = []
    started = time.monotonic()
    while pending or running:
        while pending and len(running) < jobs:
            command, model_dir = pending.pop(0)
            layout.write_json(os.path.join(model_dir, COMMAND_FILE), command[1:])
            print("$ " + " ".join(command[1:]), flush=True)
            log = open(os.path.join(model_dir, "train.log"), "a")
            running.append((subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log), log,
                            model_dir))
        process, log, model_dir = running[0]
        if process.wait() != 0:
            raise RuntimeError(
                f"training failed (exit {process.returncode}); see "
                f"{os.path.join(model_dir, 'train.log')}"
            )
        log.close()
        running.pop(0)
        done += 1
        elapsed = time.monotonic() - started
        print(f"[{done}/{total}] {model_dir} finished ({elapsed / 60:.1f} min so far)",
              flush=True)


def write_results(output_dir, results, regimes, methods, columns=COLUMNS):
    """Writes results.json (every run) and results.md (the table); returns the table.

    Args:
      output_dir: str, an existing directory.
      results: list of dicts {"regime", "method", "seed", "metrics"}.
      regimes, methods: the table's row order (see `markdown_table`).
      columns: the table's metrics (see `summarize`).
    """
    layout.write_json(os.path.join(output_dir, "results.json"), results)
    table = markdown_table(summarize(results, columns), regimes, methods, columns)
    with layout.atomic_write_path(os.path.join(output_dir, "results.md")) as path:
        with open(path, "w") as f:
            f.write(table + "\n")
    return table
