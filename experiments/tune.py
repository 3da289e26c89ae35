r"""Tunes CGC on held-out training digits, never on the test split (issue #4).

Every run trains on `cluttered_digits_holdout` (6 of every 7 train digits) with
a regime's flagfile (see reproduce.py) and reports on its validation split (the
7th digit), so choosing settings here leaves the test split untouched. One
setting is changed at a time from BASE: CGC with the paper's lambda 0.5 and
temperature 0.5, the main job's two views and crops of >= 50% of the image
(given explicitly, so the sweep does not move when a flagfile is retuned).

--sweep=cgc (the default) runs POINTS:
  plain           consistency=none: the plain baseline every point is compared with
                  (one view, one cross-entropy)
  lambda0         lambda_=0: the lambda=0 ablation (CGC's views, no consistency gradient)
  cgc             BASE
  lambda*         the weight of the consistency loss
  temperature*    the InfoNCE temperature
  min_area*       the smallest crop of T (augmentation strength)
  views3          METHOD.md's three cross-entropy views

--sweep=gc_lambda runs the GC baseline (MSE consistency, BASE otherwise) at
lambda 1 to 10000 beside plain, to show where the MSE term starts to act: the
MSE of two L2-normalised H*W heatmaps is at most 4/(H*W) (4/1024 at 32x32), so
at CGC's lambda it barely moves the step; the reference scripts default to 1000.

Writes results.json and results.md (mean +- standard deviation over seeds, one
row per point of the sweep, over every finished run in --output_dir, also of
earlier calls with other --points or --seeds) into --output_dir; resumable like
reproduce.py. The sweeps share the plain runs.

  python experiments/tune.py --regime=limited --jobs=2
  python experiments/tune.py --regime=semi --points=plain,cgc,lambda1
  python experiments/tune.py --sweep=gc_lambda --regime=full --seeds=0
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import runs  # noqa: E402  (after the path insert)

BASE = [
    "--consistency=contrastive", "--lambda_=0.5", "--temperature=0.5",
    "--transform_min_area=0.5", "--views=2",
]
POINTS = {
    "plain": ["--consistency=none"],
    "lambda0": ["--lambda_=0"],
    "cgc": [],
    "lambda0.25": ["--lambda_=0.25"],
    "lambda1": ["--lambda_=1.0"],
    "lambda2": ["--lambda_=2.0"],
    "temperature0.1": ["--temperature=0.1"],
    "temperature1": ["--temperature=1.0"],
    "min_area0.25": ["--transform_min_area=0.25"],
    "min_area0.8": ["--transform_min_area=0.8"],
    "views3": ["--views=3"],
}
GC_LAMBDAS = ("1", "10", "100", "1000", "10000")
GC_POINTS = {f"gc_lambda{value}": ["--consistency=mse", f"--lambda_={value}"]
             for value in GC_LAMBDAS}
SWEEPS = {"cgc": POINTS, "gc_lambda": {"plain": POINTS["plain"], **GC_POINTS}}
ALL_POINTS = {**POINTS, **GC_POINTS}

_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", os.path.join("cgc_runs", "tune"), "Where the runs and results go."
)
_REGIME = flags.DEFINE_enum("regime", "limited", list(runs.FLAGFILES), "Flagfile regime.")
_SWEEP = flags.DEFINE_enum("sweep", "cgc", list(SWEEPS), "Which points: CGC's or GC's lambdas.")
_POINTS = flags.DEFINE_list(
    "points", [], f"Settings to run, of {list(ALL_POINTS)}; unset: every point of --sweep."
)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds (integers).")
_EXTRA = flags.DEFINE_multi_string(
    "extra", [], "Extra cgc-train flag for every run, e.g. --extra=--examples_per_class=30."
)
_JOBS = flags.DEFINE_integer("jobs", 1, "Training runs at once.", lower_bound=1)


def point_command(regime, point, seed, model_dir, extra=()):
    """The cgc-train command of one tuning run: holdout data, BASE, the point's flags last."""
    # The plain baseline trains on labelled images only (runs.train_command).
    method = "plain" if point == "plain" else "cgc"
    return runs.train_command(
        regime, method, seed, model_dir, list(extra) + BASE + ALL_POINTS[point], holdout=True
    )


def finished_runs(output_dir, regime):
    """Every finished run of any point and seed in output_dir/regime (earlier calls too).

    Returns:
      list of dicts {"regime", "method" (the point), "seed", "metrics"}, in
      ALL_POINTS order, then by seed.
    """
    directory = os.path.join(output_dir, regime)
    found = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        point, _, seed = name.rpartition("_seed")
        if point in ALL_POINTS and seed.isdigit():
            metrics = runs.read_metrics(os.path.join(directory, name))
            if metrics is not None:
                found.append({"regime": regime, "method": point, "seed": int(seed),
                              "metrics": metrics})
    order = list(ALL_POINTS)
    return sorted(found, key=lambda run: (order.index(run["method"]), run["seed"]))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    points = _POINTS.value or list(SWEEPS[_SWEEP.value])
    unknown = [p for p in points if p not in ALL_POINTS]
    if unknown:
        raise app.UsageError(f"--points has unknown values {unknown}; allowed: {list(ALL_POINTS)}")
    try:
        seeds = [int(s) for s in _SEEDS.value]
    except ValueError as error:
        raise app.UsageError(f"--seeds must be integers, got {_SEEDS.value}") from error
    output_dir = os.path.abspath(_OUTPUT_DIR.value)
    regime = _REGIME.value
    plan = [
        (point, seed, runs.run_dir(output_dir, regime, point, seed))
        for seed in seeds
        for point in points
    ]
    runs.run_all(
        [(point_command(regime, point, seed, model_dir, _EXTRA.value), model_dir)
         for point, seed, model_dir in plan],
        _JOBS.value,
        require_record=True,
    )
    table_points = list(SWEEPS[_SWEEP.value])
    results = [run for run in finished_runs(output_dir, regime) if run["method"] in table_points]
    # Each sweep's table in its own place: results.md of --output_dir is CGC's.
    results_dir = output_dir if _SWEEP.value == "cgc" else os.path.join(output_dir, _SWEEP.value)
    os.makedirs(results_dir, exist_ok=True)
    print(runs.write_results(results_dir, results, [regime], table_points))


def run():
    app.run(main)


if __name__ == "__main__":
    run()
