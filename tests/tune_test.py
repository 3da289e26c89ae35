"""experiments/tune.py: tuning commands read the holdout data, never the test split."""

import json
import os
import tempfile

import tensorflow as tf

from experiments import runs
from experiments import tune


class TuneTest(tf.test.TestCase):
    def test_every_point_trains_on_the_holdout_with_its_flags_last(self):
        for regime in runs.FLAGFILES:
            for point, flags in tune.ALL_POINTS.items():
                command = tune.point_command(
                    regime, point, 1, "/runs/p", ["--examples_per_class=30"]
                )
                self.assertIn("--dataset=cluttered_digits_holdout", command)
                self.assertIn("--seed=1", command)
                self.assertIn("--examples_per_class=30", command)
                self.assertEqual(command[len(command) - len(flags):], flags)
                # BASE comes before the point's flags (absl: the last value wins).
                base_at = command.index(tune.BASE[0])
                self.assertEqual(command[base_at:base_at + len(tune.BASE)], tune.BASE)
                self.assertGreater(len(command) - len(flags), base_at)
                if regime == "semi" and point != "plain":
                    self.assertIn("--unlabeled=cluttered_digits_holdout", command)
                if point == "plain":  # Labelled images only, whatever the regime.
                    self.assertFalse([flag for flag in command if "unlabeled" in flag])

    def test_points_change_one_setting_each(self):
        self.assertEqual(tune.POINTS["cgc"], [])
        self.assertEqual(tune.POINTS["plain"], ["--consistency=none"])
        self.assertEqual(tune.POINTS["lambda0"], ["--lambda_=0"])
        for point, flags in tune.POINTS.items():
            self.assertLessEqual(len(flags), 1, point)
        changed = [flags[0].split("=")[0] for flags in tune.POINTS.values() if flags]
        self.assertEqual(set(changed), {flag.split("=")[0] for flag in tune.BASE})
        base = dict(flag.split("=") for flag in tune.BASE)
        for point, flags in tune.POINTS.items():
            for flag in flags:
                name, value = flag.split("=")
                self.assertNotEqual(base[name], value, point)

    def test_gc_sweep_runs_mse_at_each_lambda_beside_plain(self):
        sweep = tune.SWEEPS["gc_lambda"]
        self.assertEqual(list(sweep), ["plain"] + [f"gc_lambda{v}" for v in tune.GC_LAMBDAS])
        self.assertEqual(tune.GC_LAMBDAS, ("1", "10", "100", "1000", "10000"))
        for point in sweep:
            command = tune.point_command("full", point, 0, "/runs/p")
            consistency = [flag for flag in command if flag.startswith("--consistency")][-1]
            lambda_ = [flag for flag in command if flag.startswith("--lambda_")][-1]
            if point == "plain":
                self.assertEqual(consistency, "--consistency=none")
            else:
                self.assertEqual(consistency, "--consistency=mse")
                self.assertEqual(lambda_, "--lambda_=" + point[len("gc_lambda"):])
        # Both sweeps name the same plain run, so they share it.
        self.assertEqual(tune.SWEEPS["cgc"]["plain"], sweep["plain"])

    def test_finished_runs_collects_every_point_and_seed_in_the_directory(self):
        output_dir = tempfile.mkdtemp()
        metrics = {"accuracy": 0.5, "explanations": {"content_heatmap_percent": 60.0}}
        for name in ("views3_seed1", "plain_seed0", "plain_seed1", "lambda1_seed0", "notes"):
            os.makedirs(os.path.join(output_dir, "limited", name))
        for name in ("views3_seed1", "plain_seed1", "plain_seed0"):  # lambda1: unfinished
            with open(os.path.join(output_dir, "limited", name, "metrics.json"), "w") as f:
                json.dump(metrics, f)
        found = tune.finished_runs(output_dir, "limited")
        self.assertEqual([(r["method"], r["seed"]) for r in found],
                         [("plain", 0), ("plain", 1), ("views3", 1)])
        self.assertEqual(found[0]["metrics"]["content_heatmap_percent"], 60.0)
        self.assertEqual(tune.finished_runs(output_dir, "semi"), [])
        table = runs.markdown_table(runs.summarize(found), ["limited"], list(tune.POINTS))
        self.assertIn("| limited | views3 | 1 | 50.0 | 60.0 |", table)  # one seed: no "±"
        self.assertIn("| limited | plain | 2 | 50.0 ± 0.0 | 60.0 ± 0.0 |", table)


if __name__ == "__main__":
    tf.test.main()
