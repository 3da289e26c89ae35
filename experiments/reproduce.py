r"""Reproduces the paper's claims on the embedded cluttered digits (issue #4).

Trains the plain baseline (the reference's baseline_train_eval.py: one view, one
cross-entropy, consistency=none), the GC baseline (MSE consistency at the
reference script's lambda 1000) and CGC, each with several seeds, in three
regimes, by running the training binary with the regime's flagfile
(experiments/runs.py METHODS; `--methods=lambda0` adds the lambda=0 ablation,
CGC's multi-view step without consistency gradient):

  full     train/configs/cluttered_digits.cfg          every training label
  limited  train/configs/cluttered_digits_limited.cfg  30 labelled images per class
  semi     train/configs/cluttered_digits_semi.cfg     30 per class + the rest unlabelled
           (the plain baseline uses no unlabelled images: its semi run is the
           limited one)

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

import os
import sys

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A checkout's own cgc_tf and experiments, whether or not it is pip-installed.
sys.path.insert(0, REPO)

from experiments import runs as runs_lib  # noqa: E402  (after the path insert)
from experiments.runs import FLAGFILES, METHODS, PAPER_METHODS  # noqa: E402

_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", os.path.join("cgc_runs", "reproduce"), "Where the runs and results go."
)
_REGIMES = flags.DEFINE_list("regimes", list(FLAGFILES), f"Regimes, of {list(FLAGFILES)}.")
_METHODS = flags.DEFINE_list("methods", list(PAPER_METHODS), f"Methods, of {list(METHODS)}.")
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
                model_dir = runs_lib.run_dir(output_dir, regime, method, seed)
                command = runs_lib.train_command(regime, method, seed, model_dir, extra, _HOLDOUT.value)
                pending.append((command, model_dir))
    # require_record: run directories of earlier method definitions are refused.
    runs_lib.run_all(pending, _JOBS.value, require_record=True)

    results = []
    for regime in _REGIMES.value:
        for seed in seeds:
            for method in _METHODS.value:
                results.append({
                    "regime": regime, "method": method, "seed": seed,
                    "metrics": runs_lib.read_metrics(runs_lib.run_dir(output_dir, regime, method, seed)),
                })
    # The floor: an untrained network, the same for every regime (same test split).
    floors = runs_lib.untrained_floors(
        output_dir, seeds,
        lambda seed: os.path.join(
            runs_lib.run_dir(output_dir, _REGIMES.value[0], _METHODS.value[0], seed),
            runs_lib.CONFIG_FILE,
        ),
    )
    for regime in _REGIMES.value:
        for seed in seeds:
            results.append({"regime": regime, "method": runs_lib.UNTRAINED, "seed": seed,
                            "metrics": floors[seed]})
    print(runs_lib.write_results(output_dir, results, _REGIMES.value, _METHODS.value))


def run():
    app.run(main)


if __name__ == "__main__":
    run()
