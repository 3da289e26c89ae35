r"""Reproduces the paper's claims on the embedded cluttered digits (issue #4).

Trains the plain baseline (lambda=0), the GC baseline (MSE consistency) and CGC,
each with several seeds, in three regimes, by running the training binary with
the regime's flagfile:

  full     train/configs/cluttered_digits.cfg          every training label
  limited  train/configs/cluttered_digits_limited.cfg  10 labelled images per class
  semi     train/configs/cluttered_digits_semi.cfg     10 per class + the rest unlabelled

and evaluates an untrained network of the same architecture as a floor. Each
run's metrics come from its own `metrics.json` (test split, transforms T seeded
by the run's seed, so the three methods of one seed see the same T). Writes
`results.json` (every run) and `results.md` (mean +- standard deviation over
seeds) into --output_dir.

Interrupting loses nothing: a finished run (its metrics.json exists) is skipped,
an unfinished one resumes from its last epoch (the binary's own resume).

  python experiments/reproduce.py                      # everything, ~2 CPU cores
  python experiments/reproduce.py --regimes=limited --seeds=0
  # tuning: validation digits of cluttered_digits_holdout, never the test split
  python experiments/reproduce.py --holdout --regimes=limited --methods=cgc \
      --extra=--lambda_=1.0 --output_dir=cgc_runs/tune/lambda1
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A checkout's own cgc_tf, whether or not it is pip-installed.
sys.path.insert(0, REPO)
FLAGFILES = {
    "full": "cluttered_digits.cfg",
    "limited": "cluttered_digits_limited.cfg",
    "semi": "cluttered_digits_semi.cfg",
}
# Flags that turn the CGC flagfile into each method.
METHODS = {
    "plain": ["--lambda_=0"],
    "gc": ["--consistency=mse"],
    "cgc": [],
}
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

_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", os.path.join("cgc_runs", "reproduce"), "Where the runs and results go."
)
_REGIMES = flags.DEFINE_list("regimes", list(FLAGFILES), f"Regimes, of {list(FLAGFILES)}.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Methods, of {list(METHODS)}.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (integers).")
_EXTRA = flags.DEFINE_multi_string(
    "extra", [], "Extra cgc-train flag for every run, e.g. --extra=--epochs=2 (smoke tests)."
)
_HOLDOUT = flags.DEFINE_bool(
    "holdout", False,
    "Tune without the test split: train on cluttered_digits_holdout (6/7 of the train "
    "digits; also the unlabelled data of the semi regime) and report on its validation "
    "split (the other 1/7).",
)
_JOBS = flags.DEFINE_integer(
    "jobs", 1, "Training runs at once. Each uses every core, so 1 is fastest on a CPU.",
    lower_bound=1,
)


def run_dir(output_dir, regime, method, seed):
    """Directory of one training run."""
    return os.path.join(output_dir, regime, f"{method}_seed{seed}")


def train_command(regime, method, seed, model_dir, extra=(), holdout=False):
    """The cgc-train command line of one run (list of str).

    With `holdout`, the run trains on `cluttered_digits_holdout` (and takes its
    unlabelled data from it in the semi regime), so it is evaluated on the
    validation digits, never on the test split.
    """
    data_flags = []
    if holdout:
        data_flags = ["--dataset=cluttered_digits_holdout"]
        if regime == "semi":
            data_flags.append("--unlabeled=cluttered_digits_holdout")
    return [
        sys.executable, "-m", "train.main",
        "--flagfile=" + os.path.join(REPO, "train", "configs", FLAGFILES[regime]),
        *METHODS[method],
        f"--seed={seed}",
        f"--model_dir={model_dir}",
        "--export=false",
        *data_flags,
        *extra,
    ]


def read_metrics(model_dir):
    """The flat metrics of a finished run, or None when it has not finished."""
    path = os.path.join(model_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        metrics = json.load(f)
    return {"accuracy": metrics["accuracy"], **metrics["explanations"]}


def untrained_metrics(config_path, seed):
    """Metrics of an untrained network built as a finished run's config says.

    Args:
      config_path: a run's config.json (gives the dataset, arch, image size).
      seed: int, seeds the initial weights and the transforms T.

    Returns:
      dict metric -> float, the keys of `read_metrics`.
    """
    # Imported here: only the floor needs TensorFlow in this process.
    import keras

    from cgc_tf import config as config_lib
    from cgc_tf import data, evaluation, training

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


def summarize(runs):
    """Mean and sample standard deviation over seeds.

    Args:
      runs: list of dicts {"regime", "method", "seed", "metrics"}.

    Returns:
      dict (regime, method) -> metric -> (mean, std, n).
    """
    grouped = {}
    for run in runs:
        grouped.setdefault((run["regime"], run["method"]), []).append(run["metrics"])
    summary = {}
    for key, metric_dicts in grouped.items():
        summary[key] = {}
        for metric, _, _ in COLUMNS:
            values = np.array([m[metric] for m in metric_dicts if m.get(metric) is not None])
            if values.size:
                std = float(values.std(ddof=1)) if values.size > 1 else 0.0
                summary[key][metric] = (float(values.mean()), std, int(values.size))
    return summary


def markdown_table(summary, regimes, methods):
    """The README table: one row per regime and method, mean +- std over seeds."""
    header = "| regime | method | seeds | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 3)]
    for regime in regimes:
        for method in [UNTRAINED] + list(methods):
            row = summary.get((regime, method))
            if row is None:
                continue
            seeds = max(n for _, _, n in row.values())
            cells = []
            for metric, _, scale in COLUMNS:
                if metric not in row:
                    cells.append("n/a")
                    continue
                mean, std, _ = row[metric]
                digits = 1 if scale == 100.0 or metric == "content_heatmap_percent" else 3
                cells.append(f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}")
            lines.append(f"| {regime} | {method} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _check_choices(name, values, allowed):
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise app.UsageError(f"--{name} has unknown values {unknown}; allowed: {list(allowed)}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    _check_choices("regimes", _REGIMES.value, FLAGFILES)
    _check_choices("methods", _METHODS.value, METHODS)
    try:
        seeds = [int(s) for s in _SEEDS.value]
    except ValueError as error:
        raise app.UsageError(f"--seeds must be integers, got {_SEEDS.value}") from error
    output_dir = os.path.abspath(_OUTPUT_DIR.value)
    os.makedirs(output_dir, exist_ok=True)
    extra = list(_EXTRA.value)

    pending = []
    for regime in _REGIMES.value:
        for seed in seeds:
            for method in _METHODS.value:
                model_dir = run_dir(output_dir, regime, method, seed)
                if read_metrics(model_dir) is None:
                    pending.append((regime, method, seed, model_dir))
    total = len(_REGIMES.value) * len(seeds) * len(_METHODS.value)
    print(f"{total - len(pending)} of {total} runs already finished; {len(pending)} to run.")
    running = []
    started = time.monotonic()
    done = total - len(pending)
    while pending or running:
        while pending and len(running) < _JOBS.value:
            regime, method, seed, model_dir = pending.pop(0)
            os.makedirs(model_dir, exist_ok=True)
            command = train_command(regime, method, seed, model_dir, extra, _HOLDOUT.value)
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

    runs = []
    for regime in _REGIMES.value:
        for seed in seeds:
            for method in _METHODS.value:
                runs.append({
                    "regime": regime, "method": method, "seed": seed,
                    "metrics": read_metrics(run_dir(output_dir, regime, method, seed)),
                })
    # The floor: an untrained network, the same for every regime (same test split).
    floor_path = os.path.join(output_dir, "untrained.json")
    floors = {}
    if os.path.exists(floor_path):
        with open(floor_path) as f:
            floors = {int(k): v for k, v in json.load(f).items()}
    for seed in seeds:
        if seed not in floors:
            print(f"Evaluating an untrained network (seed {seed})", flush=True)
            some_run = run_dir(output_dir, _REGIMES.value[0], _METHODS.value[0], seed)
            floors[seed] = untrained_metrics(os.path.join(some_run, "config.json"), seed)
            with open(floor_path, "w") as f:
                json.dump(floors, f, indent=2)
    for regime in _REGIMES.value:
        for seed in seeds:
            runs.append({"regime": regime, "method": UNTRAINED, "seed": seed,
                         "metrics": floors[seed]})

    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(runs, f, indent=2)
    table = markdown_table(summarize(runs), _REGIMES.value, _METHODS.value)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
