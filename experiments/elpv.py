r"""The paper's claims on real photographs: plain / GC / CGC on the elpv solar cells.

Every regime trains and is evaluated on the monocrystalline cells
(`elpv_mono`: 806 training cells, 268 test cells; defective vs functional, see
cgc_tf/data/elpv/README.md):

  full                train/configs/elpv.cfg, --dataset=elpv_mono: every training label
  limited             train/configs/elpv_limited.cfg: N labels per class, from scratch
  limited_pretrained  the same, starting from the pretraining run's backbone
  semi                train/configs/elpv_semi.cfg: N per class + every mono training
                      cell unlabelled for the consistency term, from scratch
  semi_pretrained     the same, starting from the pretraining run's backbone

(The plain baseline has no consistency term for the unlabelled cells: its semi
rows are its limited runs with the same labelled cells.)

The pretraining run (trained once, seed 0, before anything that needs it) is the
plain baseline on the polycrystalline cells of the training split (`elpv_poly`,
1,161 cells) with elpv.cfg: another domain, the same task, never a mono cell.
Its `backbone.weights.h5` is the `--init_weights` of every *_pretrained run,
whatever the method and seed, as the paper starts every method from the same
ImageNet weights.

Methods as the reference runs them: plain (`--consistency=none`: one view,
cross-entropy only), GC (`--consistency=mse --lambda_=1000`), CGC (the
flagfile's contrastive loss). Output: --output_dir/<regime>/<method>_seed<s>/
(limited and semi regimes: <regime>_n<N>), pretrain/plain_seed0/,
results.json, results.md (mean +- std over seeds: accuracy, balanced
accuracy, insertion and deletion AUC, consistency; the untrained floor; the
pretraining run on its own poly test cells) and with --grids, grids/<regime>_seed<s>.png
(plain vs CGC Grad-CAM on the same test cells, half of them defective).
Interrupting loses nothing: finished runs are skipped, unfinished ones resume.

  python experiments/elpv.py --jobs=1                     # the whole table
  python experiments/elpv.py --regimes=limited_pretrained --labels_per_class=10,30
  python experiments/elpv.py --holdout --regimes=limited --methods=cgc \
      --extra=--lambda_=1.0 --output_dir=cgc_runs/elpv_tune/lambda1  # validation cells only
"""

import os
import sys

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A checkout's own cgc_tf and experiments, whether or not it is pip-installed.
sys.path.insert(0, REPO)

from experiments import elpv_runs  # noqa: E402  (after the path insert)
from experiments import runs as runs_lib  # noqa: E402
from experiments.elpv_runs import DEFAULT_REGIMES, FLAGFILES, METHODS  # noqa: E402

_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", os.path.join("cgc_runs", "elpv"), "Where the runs and results go."
)
_REGIMES = flags.DEFINE_list(
    "regimes", list(DEFAULT_REGIMES), f"Regimes, of {list(FLAGFILES)}."
)
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Methods, of {list(METHODS)}.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (integers).")
_LABELS_PER_CLASS = flags.DEFINE_list(
    "labels_per_class", ["30"], "N of the limited and semi regimes (integers >= 1), one run each."
)
_EXTRA = flags.DEFINE_multi_string(
    "extra", [], "Extra cgc-train flag for every run, e.g. --extra=--epochs=2 (smoke tests)."
)
_HOLDOUT = flags.DEFINE_bool(
    "holdout", False,
    "Tune without the test split: every run (the pretraining too) trains on the *_holdout "
    "configs and reports on their validation cells.",
)
_JOBS = flags.DEFINE_integer(
    "jobs", 1, "Training runs at once. Each uses every core, so 1 is fastest on a CPU.",
    lower_bound=1,
)
_GRIDS = flags.DEFINE_bool(
    "grids", True, "Write grids/<regime>_seed<s>.png: plain vs CGC heatmaps of test cells."
)
_GRID_IMAGES = flags.DEFINE_integer(
    "grid_images", 6, "Cells per grid (rows), half defective.", lower_bound=2
)


def _check_choices(name, values, allowed):
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise app.UsageError(f"--{name} has unknown values {unknown}; allowed: {list(allowed)}")


def _integers(name, values, minimum):
    try:
        numbers = [int(v) for v in values]
    except ValueError as error:
        raise app.UsageError(f"--{name} must be integers, got {values}") from error
    if any(number < minimum for number in numbers):
        raise app.UsageError(f"--{name} must be integers >= {minimum}, got {values}")
    return numbers


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    _check_choices("regimes", _REGIMES.value, FLAGFILES)
    _check_choices("methods", _METHODS.value, METHODS)
    seeds = _integers("seeds", _SEEDS.value, 0)
    counts = _integers("labels_per_class", _LABELS_PER_CLASS.value, 1)
    output_dir = os.path.abspath(_OUTPUT_DIR.value)
    os.makedirs(output_dir, exist_ok=True)

    pretraining, others = elpv_runs.plan(output_dir, _REGIMES.value, _METHODS.value, seeds, counts,
                               list(_EXTRA.value), _HOLDOUT.value)
    # The pretraining run first: the *_pretrained runs read its weights.
    if pretraining:
        runs_lib.run_all([(command, model_dir) for *_, command, model_dir in pretraining], 1)
    # A model_dir may serve two rows (see elpv_runs.plan): run it once.
    unique = {model_dir: command for *_, command, model_dir in others}
    runs_lib.run_all([(command, model_dir) for model_dir, command in unique.items()], _JOBS.value)

    results = [
        {"regime": name, "method": method, "seed": seed, "metrics": elpv_runs.read_metrics(model_dir)}
        for name, method, seed, _, model_dir in pretraining + others
    ]
    names = list(dict.fromkeys(name for name, *_ in others))
    # The floor: an untrained network of the same architecture on the same cells.
    floors = runs_lib.untrained_floors(
        output_dir, seeds,
        lambda seed: os.path.join(
            next(model_dir for _, _, run_seed, _, model_dir in others if run_seed == seed),
            runs_lib.CONFIG_FILE,
        ),
    )
    results += [{"regime": names[0], "method": runs_lib.UNTRAINED, "seed": seed,
                 "metrics": floors[seed]} for seed in seeds]
    rows = ([elpv_runs.PRETRAIN_ROW] if pretraining else []) + names
    print(runs_lib.write_results(output_dir, results, rows, _METHODS.value, elpv_runs.COLUMNS))

    model_dirs = {(name, method, seed): model_dir
                  for name, method, seed, _, model_dir in others}
    if _GRIDS.value and all(method in _METHODS.value for method in elpv_runs.GRID_METHODS):
        for name in names:
            for seed in seeds:
                run_dirs = {method: model_dirs[(name, method, seed)]
                            for method in elpv_runs.GRID_METHODS}
                path = os.path.join(output_dir, "grids", f"{name}_seed{seed}.png")
                if not os.path.exists(path):
                    print("Wrote", elpv_runs.write_grid(path, run_dirs, seed, _GRID_IMAGES.value),
                          flush=True)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
