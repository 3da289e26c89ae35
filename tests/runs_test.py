"""experiments/runs.py: run commands, aggregation over seeds, the README table."""

import json
import os
import sys
import tempfile

import numpy as np
import tensorflow as tf

from experiments import runs


def _metrics(accuracy, consistency):
    return {
        "accuracy": accuracy,
        "content_heatmap_percent": 50.0,
        "insertion_auc": 0.3,
        "deletion_auc": 0.1,
        "consistency_cosine": consistency,
        "consistency_pearson": consistency - 0.1,
        "pointing_game": 0.5,
    }


class ReproduceTest(tf.test.TestCase):
    def test_commands_use_the_regime_flagfile_and_method_flags(self):
        command = runs.train_command("limited", "plain", 2, "/runs/x", ["--epochs=1"])
        self.assertIn("--flagfile=" + os.path.join(
            runs.REPO, "train", "configs", "cluttered_digits_limited.cfg"), command)
        self.assertIn("--consistency=none", command)
        self.assertIn("--seed=2", command)
        self.assertEqual(command[-1], "--epochs=1")
        # GC at the reference scripts' default lambda, after the flagfile's.
        gc = runs.train_command("full", "gc", 0, "/r")
        self.assertEqual(gc[4:6], ["--consistency=mse", "--lambda_=1000"])
        self.assertEqual(runs.train_command("full", "lambda0", 0, "/r")[4], "--lambda_=0")
        cgc = runs.train_command("semi", "cgc", 0, "/r")
        self.assertFalse([flag for flag in cgc if flag.startswith(("--lambda_", "--consistency"))])
        for regime in runs.FLAGFILES:
            flagfile = runs.train_command(regime, "cgc", 0, "/r")[3].split("=", 1)[1]
            self.assertTrue(os.path.exists(flagfile), flagfile)
        self.assertEqual(runs.PAPER_METHODS, ("plain", "gc", "cgc"))

    def test_plain_semi_run_is_the_limited_run(self):
        """The plain baseline has no use for unlabelled images (consistency=none refuses them)."""
        self.assertEqual(
            runs.train_command("semi", "plain", 0, "/r"),
            runs.train_command("limited", "plain", 0, "/r"),
        )

        def flags(regime):
            with open(os.path.join(runs.REPO, "train", "configs", runs.FLAGFILES[regime])) as f:
                lines = [line.strip() for line in f if line.startswith("--")]
            return {line for line in lines if not line.startswith("--model_dir")}

        # The semi flagfile is the limited one plus the unlabelled data.
        self.assertEqual(
            flags("semi") - flags("limited"),
            {"--unlabeled=cluttered_digits", "--unlabeled_split=train"},
        )
        self.assertEqual(flags("limited") - flags("semi"), set())

    def test_holdout_commands_never_read_the_test_split(self):
        plain = runs.train_command("full", "plain", 0, "/r")
        self.assertFalse([flag for flag in plain if flag.startswith(("--dataset", "--unlabeled"))])
        limited = runs.train_command("limited", "cgc", 0, "/r", ["--lambda_=1"], holdout=True)
        self.assertIn("--dataset=cluttered_digits_holdout", limited)
        self.assertFalse([flag for flag in limited if flag.startswith("--unlabeled")])
        self.assertEqual(limited[-1], "--lambda_=1")
        plain_semi = runs.train_command("semi", "plain", 0, "/r", holdout=True)
        self.assertIn("--dataset=cluttered_digits_holdout", plain_semi)
        self.assertFalse([flag for flag in plain_semi if "unlabeled" in flag])
        semi = runs.train_command("semi", "cgc", 0, "/r", holdout=True)
        self.assertIn("--dataset=cluttered_digits_holdout", semi)
        self.assertIn("--unlabeled=cluttered_digits_holdout", semi)
        # The flagfile's --unlabeled=cluttered_digits comes first and is overridden.
        self.assertGreater(semi.index("--unlabeled=cluttered_digits_holdout"),
                           [flag.startswith("--flagfile") for flag in semi].index(True))

    def test_summary_is_mean_and_sample_std_over_seeds(self):
        results = [
            {"regime": "full", "method": "cgc", "seed": seed, "metrics": _metrics(acc, cos)}
            for seed, (acc, cos) in enumerate([(0.90, 0.8), (0.92, 0.9), (0.94, 1.0)])
        ]
        summary = runs.summarize(results)
        mean, std, count = summary[("full", "cgc")]["accuracy"]
        self.assertAllClose([mean, std, count], [0.92, np.std([0.9, 0.92, 0.94], ddof=1), 3])
        table = runs.markdown_table(summary, ["full"], ["plain", "cgc"])
        lines = table.splitlines()
        self.assertLen(lines, 3)  # header, rule, the one group that exists
        self.assertIn("| full | cgc | 3 | 92.0 ± 2.0 |", lines[2])
        self.assertIn("0.900 ± 0.100", lines[2])
        output_dir = tempfile.mkdtemp()
        self.assertEqual(runs.write_results(output_dir, results, ["full"], ["plain", "cgc"]), table)
        with open(os.path.join(output_dir, "results.md")) as f:
            self.assertEqual(f.read(), table + "\n")
        with open(os.path.join(output_dir, "results.json")) as f:
            self.assertEqual(json.load(f), results)

    def test_run_all_records_commands_and_refuses_other_commands(self):
        output_dir = tempfile.mkdtemp()
        first, second = os.path.join(output_dir, "a"), os.path.join(output_dir, "b")
        command = [sys.executable, "-c", "pass", "--seed=0"]
        runs.run_all([(command, first)], jobs=1)
        with open(os.path.join(first, runs.COMMAND_FILE)) as f:
            self.assertEqual(json.load(f), command[1:])
        # The same command (another interpreter path too) is accepted again.
        runs.run_all([(["python"] + command[1:], first)], jobs=1)
        other = command[:-1] + ["--seed=1"]
        with self.assertRaisesRegex(RuntimeError, "holds a run of another command"):
            runs.run_all([(other, first)], jobs=1)
        # A started run without a record: refused only when records are required.
        os.makedirs(second)
        with open(os.path.join(second, "config.json"), "w") as f:
            f.write("{}")
        runs.check_same_command(command, second, require_record=False)
        with self.assertRaisesRegex(RuntimeError, r"another command \(command.json: None\)"):
            runs.run_all([(command, second)], jobs=1, require_record=True)
        self.assertFalse(os.path.exists(os.path.join(second, runs.COMMAND_FILE)))

    def test_read_metrics_waits_for_a_finished_run(self):
        model_dir = tempfile.mkdtemp()
        self.assertIsNone(runs.read_metrics(model_dir))
        with open(os.path.join(model_dir, "metrics.json"), "w") as f:
            json.dump({"accuracy": 0.5, "explanations": {"consistency_cosine": 0.7}}, f)
        self.assertEqual(
            runs.read_metrics(model_dir), {"accuracy": 0.5, "consistency_cosine": 0.7}
        )


if __name__ == "__main__":
    tf.test.main()


class UntrainedFloorsTest(tf.test.TestCase):
    def test_floors_are_computed_once_per_seed_and_cached(self):
        calls = []

        def fake_untrained_metrics(config_path, seed):
            calls.append((config_path, seed))
            return _metrics(0.1 * (seed + 1), 0.9)

        output_dir = self.get_temp_dir()
        original = runs.untrained_metrics
        runs.untrained_metrics = fake_untrained_metrics
        try:
            first = runs.untrained_floors(output_dir, [0, 1], lambda seed: f"/runs/{seed}/config.json")
            again = runs.untrained_floors(output_dir, [0, 1, 2], lambda seed: f"/runs/{seed}/config.json")
        finally:
            runs.untrained_metrics = original
        self.assertEqual(calls, [("/runs/0/config.json", 0), ("/runs/1/config.json", 1),
                                 ("/runs/2/config.json", 2)])
        self.assertAllClose(first[1]["accuracy"], 0.2)
        self.assertEqual(sorted(again), [0, 1, 2])
        with open(os.path.join(output_dir, "untrained.json")) as f:
            self.assertEqual(sorted(json.load(f)), ["0", "1", "2"])
