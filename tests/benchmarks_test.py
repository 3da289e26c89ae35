"""Tests of benchmarks/: the shared helpers, and each benchmark end to end on a tiny setup.

The end-to-end tests (slow) run the benchmarks as `python -m benchmarks.<name>` on
tiny models and images and check the printed table and JSON lines; they make no
assertion on timings (the machine is shared), only on what must hold whatever
the speed: the requested settings, and every ratio, rate and summary recomputed
from the record's own fields.
"""

import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys

from absl import app
from absl.testing import parameterized
import pytest
import tensorflow as tf

from benchmarks import common
from tests import testing_processes


def _run_benchmark(module, *flags):
    """Runs a benchmark module; returns (table lines, JSON records)."""
    completed = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *flags],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=testing_processes.REPO,
        env=testing_processes.subprocess_environment(),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    table = [line for line in lines if not line.startswith("{")]
    return table, records


class _RecordChecks(tf.test.TestCase):
    """What a benchmark record's numbers mean, recomputed from its own fields."""

    def assert_summary(self, record, timed_steps, prefix=""):
        """median/min/max/CPU median (seconds) are those of the record's per-round times."""
        wall, cpu = record[f"{prefix}wall_s"], record[f"{prefix}cpu_s"]
        self.assertLen(wall, timed_steps)
        self.assertLen(cpu, timed_steps)
        self.assertEqual(record[f"{prefix}timed_steps"], timed_steps)
        self.assertTrue(all(value > 0 for value in wall), wall)
        self.assertAllClose(record[f"{prefix}median_s"], statistics.median(wall))
        self.assertAllClose(record[f"{prefix}min_s"], min(wall))
        self.assertAllClose(record[f"{prefix}max_s"], max(wall))
        self.assertAllClose(record[f"{prefix}cpu_median_s"], statistics.median(cpu))

    def assert_ratios_to(self, record, reference, name):
        """ratio_to_<name> is the median of the per-round quotients of the wall times."""
        self.assertAllClose(
            record[f"ratio_to_{name}"], common.paired_ratio(record["wall_s"], reference["wall_s"])
        )
        self.assertAllClose(
            record[f"cpu_ratio_to_{name}"],
            common.paired_ratio(record["cpu_s"], reference["cpu_s"]),
        )


class CommonTest(tf.test.TestCase, parameterized.TestCase):

    def test_interleaved_times_rotates_the_order(self):
        calls = []
        functions = {name: (lambda name=name: calls.append(name)) for name in "abc"}
        times = common.interleaved_times(functions, warmup_steps=1, timed_steps=3)
        # Warm-up in order, then rounds rotated by one position each.
        self.assertEqual(calls, list("abc") + list("abc") + list("bca") + list("cab"))
        for name in "abc":
            self.assertLen(times[name]["wall"], 3)
            self.assertLen(times[name]["cpu"], 3)
            self.assertTrue(all(value >= 0 for value in times[name]["wall"]))

    def test_interleaved_times_rejects_zero_steps(self):
        with self.assertRaisesRegex(ValueError, "timed_steps=0"):
            common.interleaved_times({"a": lambda: None}, 1, 0)

    def test_summarize(self):
        summary = common.summarize({"wall": [3.0, 1.0, 2.0, 10.0], "cpu": [1.0, 1.0, 2.0, 2.0]})
        self.assertEqual(summary["median_s"], 2.5)
        self.assertEqual(summary["min_s"], 1.0)
        self.assertEqual(summary["max_s"], 10.0)
        self.assertEqual(summary["cpu_median_s"], 1.5)
        self.assertEqual(summary["timed_steps"], 4)
        self.assertEqual(summary["wall_s"], [3.0, 1.0, 2.0, 10.0])
        self.assertEqual(summary["cpu_s"], [1.0, 1.0, 2.0, 2.0])

    def test_paired_ratio_is_the_median_of_per_round_ratios(self):
        # Round 2 ran under load: both got slower, the ratio did not change.
        self.assertAllClose(common.paired_ratio([3.0, 30.0, 3.3], [1.0, 10.0, 1.0]), 3.0)

    def test_format_table(self):
        table = common.format_table(
            [{"name": "plain", "seconds": 0.5}, {"name": "cgc3", "seconds": 1234.5}],
            [("name", "variant"), ("seconds", "s"), ("missing", "other")],
        )
        lines = table.splitlines()
        self.assertLen(lines, 4)
        self.assertEqual(lines[0].split(), ["variant", "s", "other"])
        self.assertEqual(lines[2].split(), ["plain", "0.500", "-"])
        self.assertEqual(lines[3].split(), ["cgc3", "1234", "-"])

    def test_emit_records_writes_one_json_object_per_line(self):
        stream = io.StringIO()
        common.emit_records([{"b": 1, "a": [1, 2]}, {"c": None}], stream)
        self.assertEqual(
            [json.loads(line) for line in stream.getvalue().splitlines()],
            [{"a": [1, 2], "b": 1}, {"c": None}],
        )

    def test_peak_rss_is_at_least_current_rss(self):
        current = common.current_rss_bytes()
        if current is None:
            self.skipTest("no /proc/self/status on this platform")
        self.assertGreaterEqual(common.peak_rss_bytes(), current)

    def test_ratios_to(self):
        times = {"wall": [2.0, 20.0, 2.2], "cpu": [1.0, 1.0, 1.0]}
        reference = {"wall": [1.0, 10.0, 1.0], "cpu": [2.0, 2.0, 2.0]}
        self.assertEqual(
            common.ratios_to(times, reference, "plain"),
            {"ratio_to_plain": 2.0, "cpu_ratio_to_plain": 0.5},
        )

    def test_flag_checks(self):
        common.check_subsets((("methods", ["dense"], ("gather", "dense")),))
        common.check_minimums((("batch_size", 1, 1),))
        with self.assertRaisesRegex(app.UsageError, r"--methods=\[\] must be a non-empty subset"):
            common.check_subsets((("methods", [], ("gather", "dense")),))
        with self.assertRaisesRegex(app.UsageError, r"--methods=\['sparse'\] must be"):
            common.check_subsets((("methods", ["sparse"], ("gather", "dense")),))
        with self.assertRaisesRegex(app.UsageError, r"--batch_size=0 must be >= 1"):
            common.check_minimums((("batch_size", 0, 1),))

    def test_baseline_step_is_the_plain_classifier_step(self):
        """CGCModel(consistency="none") steps exactly as the Keras classifier on the same view."""
        batch = common.random_batch(2, 16, 3, seed=0)
        logs, weights = {}, {}
        for variant in ("plain", "baseline"):
            model = common.build_step_model(variant, "small_resnet", 16, 3, "false", 0.1, seed=0)
            logs[variant] = common.make_train_step(model, variant, batch)()
            backbone = model if variant == "plain" else model.backbone
            weights[variant] = [w.numpy() for w in backbone.weights]
        # make_train_step's untimed first step plus one step.
        self.assertAllClose(logs["baseline"]["loss"], logs["plain"]["loss"], atol=1e-5)
        for actual, expected in zip(weights["baseline"], weights["plain"], strict=True):
            self.assertAllClose(actual, expected, atol=1e-5)

    def test_jit_value(self):
        self.assertIs(common.jit_value("false"), False)
        self.assertEqual(common.jit_value("auto"), "auto")
        with self.assertRaisesRegex(ValueError, "jit_compile='yes'"):
            common.jit_value("yes")


@pytest.mark.slow
class ExplainThroughputTest(tf.test.TestCase):
    """The correctness logic of benchmarks/explain_throughput.py on a tiny model (no timings)."""

    @staticmethod
    def _tiny(activation):
        import keras

        keras.utils.set_random_seed(0)
        inputs = keras.Input((16, 16, 3))
        x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv1")(inputs)
        x = keras.layers.Conv2D(5, 3, strides=2, padding="same", name="conv2")(x)
        x = keras.layers.Activation("relu", name="features")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(3, activation=activation, name="predictions")(x)
        return keras.Model(inputs, outputs, name="tiny")

    def test_cosines_by_hand(self):
        from benchmarks import explain_throughput

        first = [[[3.0, 0.0]], [[1.0, 1.0]], [[0.0, 0.0]]]
        second = [[[1.0, 1.0]], [[2.0, 2.0]], [[1.0, 0.0]]]
        self.assertAllClose(
            explain_throughput.cosines(first, second), [2**-0.5, 1.0, 0.0], atol=1e-12
        )

    def test_tape_oracle_is_the_closed_form_of_a_pooling_dense_head(self):
        import keras
        import numpy as np

        from benchmarks import explain_throughput

        model = self._tiny(None)
        images = tf.random.stateless_uniform([2, 16, 16, 3], seed=[1, 2])
        index = model.layers.index(model.get_layer("features"))
        classes = np.array([2, 0])
        features = keras.Model(model.inputs, model.get_layer("features").output)(images).numpy()
        kernel = model.get_layer("predictions").kernel.numpy()
        expected = np.maximum(np.einsum("bhwk,kb->bhw", features, kernel[:, classes]), 0) / 64
        oracle = explain_throughput.tape_gradcam(model, index, images, classes)
        self.assertGreater(expected.max(), 0.0)
        self.assertAllClose(oracle, expected, atol=1e-7, rtol=1e-5)

    def test_correctness_on_a_tiny_softmax_model(self):
        import numpy as np

        from benchmarks import explain_throughput

        if importlib.util.find_spec("tf_keras_vis") is None:
            self.skipTest('tf-keras-vis is not installed (pip install -e ".[benchmark]")')

        model = self._tiny("softmax")
        twin = self._tiny(None)
        twin.set_weights(model.get_weights())
        images = tf.random.stateless_uniform([2, 16, 16, 3], seed=[3, 4])
        results, classes = explain_throughput.correctness(model, twin, "features", images)
        self.assertAllEqual(classes, np.argmax(twin(images).numpy(), axis=-1))
        self.assertGreater(results["ours_oracle_cosine"], 0.99999)
        # With the same layer and the logits, the peer computes the same Grad-CAM.
        self.assertGreater(results["peer_oracle_cosine"], 0.99999)
        # Without arguments the peer seeks the last Conv layer: before the ReLU.
        self.assertEqual(results["peer_default_layer"], "conv2")
        self.assertNotIn("ours_oracle64_cosine", results)

    def test_parse_models(self):
        from benchmarks import explain_throughput

        self.assertEqual(
            explain_throughput.parse_models(["ResNet50:16", "MobileNetV2:32"]),
            [("ResNet50", 16), ("MobileNetV2", 32)],
        )
        for bad in ("ResNet50", "ResNet50:0", "NoSuchNet:4"):
            with self.assertRaisesRegex(app.UsageError, "NAME:BATCH"):
                explain_throughput.parse_models([bad])


class BenchmarksEndToEndTest(_RecordChecks):

    @pytest.mark.slow  # a benchmark process: 10-60 s of CPU
    def test_step_time(self):
        table, records = _run_benchmark(
            "step_time",
            "--arch=small_resnet",
            "--image_size=16",
            "--batch_size=4",
            "--num_classes=3",
            # Each variant costs a memory-probe process (a TensorFlow start).
            "--variants=plain,baseline,cgc2",
            "--warmup_steps=1",
            "--timed_steps=2",
            "--memory_steps=1",
        )
        self.assertTrue(any(line.startswith("device:") for line in table))
        self.assertTrue(any("x plain" in line and "peak MiB" in line for line in table))
        self.assertEqual([r["variant"] for r in records], ["plain", "baseline", "cgc2"])
        for record in records:
            self.assertEqual(record["timed_steps"], 2)
            self.assertLessEqual(record["min_s"], record["median_s"])
            self.assertLessEqual(record["median_s"], record["max_s"])
            self.assertGreater(record["peak_mib"], 0)
            self.assertGreaterEqual(record["step_mib"], 0)
            self.assertEqual(record["device"], "CPU")
        plain = records[0]
        self.assertEqual(plain["ratio_to_plain"], 1.0)
        self.assertEqual(plain["peak_ratio"], 1.0)
        self.assertEqual([r["views"] for r in records], [1, 1, 2])
        for record in records:
            # The requested setup, and the numbers recomputed from the record's fields.
            self.assertEqual(
                (record["arch"], record["image_size"], record["batch_size"],
                 record["num_classes"], record["jit_compile"], record["dtype_policy"]),
                ("small_resnet", 16, 4, 3, "false", "float32"),
            )
            self.assert_summary(record, timed_steps=2)
            self.assertAllClose(record["images_per_s"], 4 / record["median_s"])
            self.assertEqual(record["plain_median_s"], plain["median_s"])
            self.assert_ratios_to(record, plain, "plain")
            self.assertAllClose(record["peak_ratio"], record["peak_mib"] / plain["peak_mib"])
            self.assertAllClose(
                record["step_memory_ratio"], record["step_mib"] / plain["step_mib"]
            )
            # The allocator's peak is tensors written during the steps: resident memory.
            self.assertGreaterEqual(record["peak_rss_mib"], record["peak_mib"])
        # The CGC step keeps the activations of two forward passes and the Grad-CAM
        # gradients for its backward pass: more than the plain step, whatever the speed.
        cgc2 = records[2]
        self.assertGreater(cgc2["peak_ratio"], 1.0)
        self.assertGreater(cgc2["step_memory_ratio"], 1.0)

    @pytest.mark.slow  # a benchmark process: 10-60 s of CPU
    def test_step_time_float32_and_auto_side_by_side(self):
        from cgc_tf import distribute

        _, records = _run_benchmark(
            "step_time", "--arch=small_resnet", "--image_size=16", "--batch_size=4",
            "--num_classes=3", "--variants=plain", "--dtype_policy=float32,auto",
            "--warmup_steps=1", "--timed_steps=2", "--memory=none",
        )
        self.assertEqual([r["dtype_policy"] for r in records], ["float32", "auto"])
        auto_policy = distribute.resolve_mixed_precision("auto", "default")[0]
        self.assertEqual([r["keras_dtype_policy"] for r in records], ["float32", auto_policy])
        self.assertEqual(records[0]["ratio_to_float32"], 1.0)
        self.assertGreater(records[1]["ratio_to_float32"], 0.0)
        for record in records:
            self.assert_summary(record, timed_steps=2)
            self.assert_ratios_to(record, records[0], "float32")
            # One variant: each policy's plain step is its own reference.
            self.assertEqual(record["ratio_to_plain"], 1.0)
            self.assertNotIn("peak_mib", record)  # --memory=none

    @pytest.mark.slow  # a benchmark process: 10-60 s of CPU
    def test_explain_latency(self):
        table, records = _run_benchmark(
            "explain_latency",
            "--arch=small_resnet",
            "--image_size=16",
            "--num_classes=3",
            "--batch_sizes=1,2",
            "--warmup_calls=1",
            "--timed_calls=2",
        )
        self.assertTrue(any("heatmap overhead" in line for line in table))
        self.assertEqual(
            [(r["surface"], r["batch_size"]) for r in records],
            [(s, b) for s in ("keras", "saved_model", "onnx") for b in (1, 2)],
        )
        for record in records:
            self.assertGreater(record["predict_median_ms"], 0)
            self.assertGreater(record["explain_median_ms"], 0)
            self.assertEqual(
                (record["arch"], record["image_size"], record["num_classes"]),
                ("small_resnet", 16, 3),
            )
            for kind in ("predict", "explain"):
                self.assert_summary(record, timed_steps=2, prefix=f"{kind}_")
                self.assertAllClose(
                    record[f"{kind}_median_ms"], 1000 * record[f"{kind}_median_s"]
                )
            # Overhead = median of the per-round explain / predict quotients - 1.
            self.assertAllClose(
                record["heatmap_overhead"],
                common.paired_ratio(record["explain_wall_s"], record["predict_wall_s"]) - 1,
            )
            self.assertAllClose(
                record["heatmap_cpu_overhead"],
                common.paired_ratio(record["explain_cpu_s"], record["predict_cpu_s"]) - 1,
            )
            # The backbone has a pooling + dense head: exports use the closed form.
            expected = "gradient_tape" if record["surface"] == "keras" else "closed_form"
            self.assertEqual(record["heatmap_method"], expected)

    @pytest.mark.slow  # a benchmark process: 10-60 s of CPU
    def test_input_pipeline(self):
        table, records = _run_benchmark(
            "input_pipeline",
            "--num_images=10",
            "--jpeg_width=40",
            "--jpeg_height=30",
            "--num_classes=2",
            "--image_size=16",
            "--batch_size=4",
            "--epochs=2",
            "--arch=small_resnet",
            "--consumer_steps=1",
        )
        self.assertTrue(any("CGC step img/s" in line for line in table))
        self.assertTrue(any("records: prepare" in line for line in table))
        summaries = [r for r in records if r["kind"] == "summary"]
        # One set of rows per input, folder first, against the same consumer step.
        self.assertEqual([r["input"] for r in summaries], ["folder", "records"])
        self.assertEqual(summaries[0]["consumer_median_s"], summaries[1]["consumer_median_s"])
        self.assertEqual(summaries[0]["prepare_s"], 0.0)
        self.assertGreater(summaries[1]["prepare_s"], 0.0)
        for summary in summaries:
            epochs = [r for r in records
                      if r["kind"] == "pipeline_epoch" and r["input"] == summary["input"]]
            self.assertEqual([r["epoch"] for r in epochs], [1, 2])
            # Incomplete batches are dropped: 2 batches of 4 out of 10 images.
            self.assertEqual([r["images"] for r in epochs], [8, 8])
            for epoch in epochs:
                self.assertGreater(epoch["seconds"], 0.0)
                self.assertAllClose(epoch["images_per_s"], epoch["images"] / epoch["seconds"])
            self.assertEqual(
                (summary["num_images"], summary["batch_size"], summary["image_size"]),
                (10, 4, 16),
            )
            self.assertAllClose(summary["consumer_images_per_s"], 4 / summary["consumer_median_s"])
            self.assertAllClose(
                summary["first_epoch_to_step_ratio"],
                summary["first_epoch_images_per_s"] / summary["consumer_images_per_s"],
            )
            self.assertEqual(summary["pipeline_images_per_s"], epochs[-1]["images_per_s"])
            self.assertEqual(summary["first_epoch_images_per_s"], epochs[0]["images_per_s"])
            self.assertAllClose(
                summary["pipeline_to_step_ratio"],
                summary["pipeline_images_per_s"] / summary["consumer_images_per_s"],
            )

    def test_input_pipeline_rejects_unknown_inputs(self):
        completed = subprocess.run(
            [sys.executable, "-m", "benchmarks.input_pipeline", "--inputs=folder,tape"],
            capture_output=True, text=True, timeout=300, cwd=testing_processes.REPO,
            env=testing_processes.subprocess_environment(),
        )
        self.assertNotEqual(completed.returncode, 0)
        self.assertIn("--inputs=folder,tape must be distinct names from", completed.stderr)

    @pytest.mark.slow  # a benchmark process: 10-60 s of CPU
    def test_crop_flip_resize(self):
        table, records = _run_benchmark(
            "crop_flip_resize",
            "--batch_size=2",
            "--image_size=16",
            "--warmup_calls=1",
            "--timed_calls=2",
        )
        self.assertTrue(any(line.startswith("device:") for line in table))
        self.assertTrue(any("x gather" in line and "max |diff|" in line for line in table))
        # Every workload x XLA setting x method, the gather method first.
        self.assertEqual(
            [(r["workload"], r["jit_compile"], r["method"]) for r in records],
            [
                (workload, jit, method)
                for workload in ("images", "heatmaps")
                for jit in ("false", "true")
                for method in ("gather", "dense")
            ],
        )
        for record in records:
            self.assertEqual((record["batch_size"], record["image_size"]), (2, 16))
            self.assertEqual(record["timed_calls"], 2)
            self.assertLessEqual(record["min_ms"], record["median_ms"])
            self.assertLessEqual(record["median_ms"], record["max_ms"])
            # The same transform by all four routes: float rounding apart, one output.
            self.assertLess(record["max_abs_difference"], 1e-4)
            if record["method"] == "gather":
                self.assertEqual(record["ratio_to_gather"], 1.0)
                if record["jit_compile"] == "false":
                    self.assertEqual(record["max_abs_difference"], 0.0)

    @pytest.mark.slow  # a benchmark process: 10-60 s of CPU
    def test_reference_torch(self):
        try:
            import torch  # noqa: F401  (optional benchmark dependency)
        except ImportError:
            self.skipTest("torch is not installed (optional, see docs/performance.md)")
        table, records = _run_benchmark(
            "reference_torch",
            "--arch=resnet18",
            "--image_size=32",
            "--batch_size=2",
            "--num_classes=3",
            "--warmup_steps=1",
            "--timed_steps=1",
        )
        self.assertTrue(any("x plain" in line for line in table))
        self.assertEqual([r["variant"] for r in records], ["plain", "cgc3", "cgc2"])
        self.assertEqual(records[0]["ratio_to_plain"], 1.0)
        for record in records:
            self.assertNotIn("error", record)
            self.assertEqual(
                (record["arch"], record["image_size"], record["batch_size"],
                 record["num_classes"]),
                ("resnet18", 32, 2, 3),
            )
            self.assert_summary(record, timed_steps=1)
            self.assertEqual(record["plain_median_s"], records[0]["median_s"])
            self.assert_ratios_to(record, records[0], "plain")

    @pytest.mark.slow  # a benchmark process: 10-60 s of CPU
    def test_reference_torch_with_the_reference_code_under_autocast(self):
        try:
            import torch  # noqa: F401  (optional benchmark dependency)
        except ImportError:
            self.skipTest("torch is not installed (optional, see docs/performance.md)")
        from benchmarks import torch_steps

        model_file = os.path.join(torch_steps.DEFAULT_REFERENCE_DIR, "models",
                                  "resnet_multigpu_cgc.py")
        if not os.path.exists(model_file):
            self.skipTest(f"the reference code is not at {torch_steps.DEFAULT_REFERENCE_DIR}")
        _, records = _run_benchmark(
            "reference_torch", "--model_code=reference", "--autocast=bfloat16",
            "--variants=plain", "--arch=resnet18", "--image_size=32", "--batch_size=2",
            "--num_classes=3", "--warmup_steps=1", "--timed_steps=1",
        )
        (record,) = records
        self.assertEqual((record["model_code"], record["autocast"]), ("reference", "bfloat16"))
        self.assertGreater(record["median_s"], 0.0)
        self.assert_summary(record, timed_steps=1)
        self.assertEqual(record["ratio_to_plain"], 1.0)

    @pytest.mark.slow  # a benchmark process: 10-60 s of CPU
    def test_step_time_beside_the_torch_step_at_float32_and_auto(self):
        try:
            import torch  # noqa: F401  (optional benchmark dependency)
        except ImportError:
            self.skipTest("torch is not installed (optional, see docs/performance.md)")
        from benchmarks import torch_steps
        from cgc_tf import distribute

        with self.assertRaisesRegex(ValueError, "variant='cgc2' must be one of"):
            torch_steps.make_step("reference", "cgc2", "resnet18", 3, None, 0)
        table, records = _run_benchmark(
            "step_time", "--arch=resnet18", "--image_size=64", "--batch_size=2",
            "--num_classes=3", "--variants=plain,cgc2", "--dtype_policy=float32,auto",
            "--torch_reference=transcription", "--warmup_steps=1", "--timed_steps=1",
            "--memory=none",
        )
        self.assertTrue(any("x torch" in line for line in table))
        auto_policy = distribute.resolve_mixed_precision("auto", "default")[0]
        autocast = {"float32": "none", "mixed_bfloat16": "bfloat16"}[auto_policy]
        self.assertEqual(
            [(r["framework"], r["variant"], r["keras_dtype_policy"], r.get("autocast"))
             for r in records],
            [("tensorflow", v, p, None) for p in ("float32", auto_policy) for v in ("plain", "cgc2")]
            + [("torch", v, p, a) for p, a in (("float32", "none"), (auto_policy, autocast))
               for v in ("plain", "cgc2")],
        )
        ours, theirs = records[:4], records[4:]
        for record in records:
            self.assertNotIn("error", record)
            self.assertGreater(record["median_s"], 0.0)
        for record, torch_record in zip(ours, theirs):
            # One timed round: the per-round ratio is the quotient of the two medians.
            self.assertAllClose(
                record["ratio_to_torch"], record["median_s"] / torch_record["median_s"]
            )
            self.assertAllClose(
                record["cpu_ratio_to_torch"],
                record["cpu_median_s"] / torch_record["cpu_median_s"],
            )
        for torch_record in theirs:
            self.assertEqual(torch_record["torch_model_code"], "transcription")
            self.assertAllClose(
                torch_record["ratio_to_plain"],
                torch_record["median_s"] / torch_record["plain_median_s"],
            )
        self.assertEqual((theirs[0]["ratio_to_plain"], theirs[0]["ratio_to_float32"]), (1.0, 1.0))


if __name__ == "__main__":
    tf.test.main()
