"""experiments/elpv.py: the commands of every regime, the run plan, the metrics read."""

import json
import os
import tempfile

import tensorflow as tf

from cgc_tf import model_dir
from experiments import elpv_runs as elpv
from experiments import runs


def _flag(command, name):
    """The value of --name in a command (the last one wins, as in absl), or None."""
    values = [flag.split("=", 1)[1] for flag in command if flag.startswith(f"--{name}=")]
    return values[-1] if values else None


class CommandTest(tf.test.TestCase):
    def test_every_regime_trains_on_the_mono_cells_with_its_flagfile(self):
        for regime, flagfile in elpv.FLAGFILES.items():
            command = elpv.train_command(regime, "cgc", 1, "/out/r", "/out", 10)
            path = os.path.join(runs.REPO, "train", "configs", flagfile)
            self.assertEqual(_flag(command, "flagfile"), path)
            self.assertTrue(os.path.exists(path), path)
            self.assertEqual(_flag(command, "dataset"), "elpv_mono")
            self.assertEqual(_flag(command, "seed"), "1")
            self.assertEqual(_flag(command, "model_dir"), "/out/r")
            self.assertEqual(_flag(command, "export"), "false")
            limited = regime != "full"
            self.assertEqual(_flag(command, "examples_per_class"), "10" if limited else None)
            self.assertEqual(_flag(command, "unlabeled"),
                             "elpv_mono" if regime.startswith("semi") else None)
            self.assertEqual(_flag(command, "init_weights"),
                             "/out/pretrain/plain_seed0/backbone.weights.h5"
                             if regime.endswith("_pretrained") else None)

    def test_methods_are_the_reference_baselines(self):
        plain = elpv.train_command("full", "plain", 0, "/r", "/out")
        self.assertEqual(_flag(plain, "consistency"), "none")
        gc = elpv.train_command("full", "gc", 0, "/r", "/out")
        self.assertEqual((_flag(gc, "consistency"), _flag(gc, "lambda_")), ("mse", "1000"))
        cgc = elpv.train_command("full", "cgc", 0, "/r", "/out")
        self.assertFalse([f for f in cgc if f.startswith(("--lambda_", "--consistency"))])

    def test_pretraining_is_plain_on_the_poly_cells(self):
        command = elpv.pretrain_command("/out", ["--epochs=2"])
        self.assertEqual(_flag(command, "dataset"), "elpv_poly")
        self.assertEqual(_flag(command, "consistency"), "none")
        self.assertEqual(_flag(command, "model_dir"), elpv.pretrain_dir("/out"))
        self.assertEqual(command[-1], "--epochs=2")
        weights = elpv.pretrained_weights("/out")
        self.assertEqual(os.path.dirname(weights), elpv.pretrain_dir("/out"))
        self.assertEqual(os.path.basename(weights), model_dir.BACKBONE_WEIGHTS_FILE)

    def test_holdout_never_names_a_test_split_dataset(self):
        commands = [elpv.pretrain_command("/out", holdout=True)] + [
            elpv.train_command(regime, "cgc", 0, "/r", "/out", holdout=True)
            for regime in elpv.FLAGFILES
        ]
        for command in commands:
            self.assertTrue(_flag(command, "dataset").endswith("_holdout"), command)
            unlabeled = _flag(command, "unlabeled")
            self.assertTrue(unlabeled is None or unlabeled.endswith("_holdout"), command)

    def test_extra_flags_come_last(self):
        command = elpv.train_command("semi", "gc", 0, "/r", "/out", extra=["--lambda_=5"])
        self.assertEqual(command[-1], "--lambda_=5")
        self.assertEqual(_flag(command, "lambda_"), "5")


class PlanTest(tf.test.TestCase):
    def test_pretraining_only_when_a_pretrained_regime_is_asked_for(self):
        pretraining, others = elpv.plan("/out", ["full", "limited"], ["plain", "cgc"], [0, 1], [30])
        self.assertEmpty(pretraining)
        self.assertLen(others, 2 * 2 * 2)
        pretraining, others = elpv.plan(
            "/out", ["limited_pretrained", "semi"], ["plain", "gc", "cgc"], [0, 1, 2], [10, 30]
        )
        self.assertLen(pretraining, 1)
        self.assertLen(others, 2 * 2 * 3 * 3)
        names = sorted({name for name, *_ in others})
        self.assertEqual(names, ["limited_pretrained_n10", "limited_pretrained_n30",
                                 "semi_n10", "semi_n30"])
        model_dirs = [model_dir for name, method, *_, model_dir in others
                      if not (name.startswith("semi") and method == "plain")]
        self.assertLen(set(model_dirs), len(model_dirs))
        for name, method, seed, command, model_dir in others:
            self.assertEqual(_flag(command, "examples_per_class"), name.rsplit("_n", 1)[1])
            if name.startswith("semi") and method == "plain":
                # The plain baseline cannot use unlabelled cells: its limited run.
                limited = name.replace("semi", "limited", 1)
                self.assertEqual(model_dir, runs.run_dir("/out", limited, method, seed))
                self.assertEqual(command, elpv.train_command(
                    "limited", method, seed, model_dir, "/out", int(name.rsplit("_n", 1)[1])))
                self.assertIsNone(_flag(command, "unlabeled"))
            else:
                self.assertEqual(model_dir, runs.run_dir("/out", name, method, seed))

    def test_read_metrics_adds_the_training_minutes(self):
        model_dir = tempfile.mkdtemp()
        self.assertIsNone(elpv.read_metrics(model_dir))
        with open(os.path.join(model_dir, "metrics.json"), "w") as f:
            json.dump({"accuracy": 0.5, "epochs": 30, "mean_epoch_seconds_this_time": 4.0,
                       "explanations": {"balanced_accuracy": 0.6}}, f)
        self.assertEqual(elpv.read_metrics(model_dir),
                         {"accuracy": 0.5, "balanced_accuracy": 0.6, "train_minutes": 2.0})

    def test_table_has_the_balanced_accuracy(self):
        results = [{"regime": "full", "method": "cgc", "seed": seed,
                    "metrics": {"accuracy": 0.8, "balanced_accuracy": balanced}}
                   for seed, balanced in enumerate([0.6, 0.7])]
        table = runs.markdown_table(runs.summarize(results, elpv.COLUMNS), ["full"], ["cgc"],
                                    elpv.COLUMNS)
        self.assertIn("balanced acc. %", table.splitlines()[0])
        self.assertIn("| full | cgc | 2 | 80.0 ± 0.0 | 65.0 ± 7.1 |", table)


if __name__ == "__main__":
    tf.test.main()
