"""Tests for cgc_tf.evaluation on a tiny model and a tiny in-memory dataset."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import cgc_tf
from cgc_tf import evaluation
from cgc_tf import metrics
from tests import testing_models
from tests import testing_processes

IMAGE_SIZE = 16
NUM_IMAGES = 6
STEPS = 4


def tiny_dataset(with_boxes=True, batch_size=4, num_images=NUM_IMAGES):
    rng = np.random.default_rng(0)
    elements = {
        "image": rng.uniform(size=(num_images, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32),
        "label": (np.arange(num_images) % 3).astype(np.int32),
    }
    if with_boxes:
        boxes = np.full((num_images, 2, 4), -1.0, np.float32)
        boxes[:, 0] = [0.1, 0.2, 0.6, 0.9]
        boxes[::2, 1] = [0.5, 0.5, 1.0, 1.0]
        elements["bbox"] = boxes
    return tf.data.Dataset.from_tensor_slices(elements).batch(batch_size)


def tiny_model(seed=0):
    return cgc_tf.CGCModel(testing_models.tiny_convnet(image_size=IMAGE_SIZE, seed=seed))


class EvaluateModelTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = tiny_model()
        cls.other = tiny_model(seed=1)
        cls.results = evaluation.evaluate_model(
            cls.model, tiny_dataset(), auc_steps=STEPS, progress=False
        )

    def test_all_keys_with_sane_ranges(self):
        results = self.results
        for metric in evaluation.PER_IMAGE_METRICS:
            self.assertIn(metric, results)
            self.assertIn(f"{metric}_count", results)
        self.assertEqual(results["num_images"], NUM_IMAGES)
        self.assertEqual(results["accuracy_count"], NUM_IMAGES)
        self.assertEqual(
            results["content_heatmap_percent_count"] + results["content_heatmap_skipped"],
            NUM_IMAGES,
        )
        for metric in ("accuracy", "pointing_game", "insertion_auc", "deletion_auc"):
            self.assertBetween(results[metric], 0.0, 1.0)
        self.assertBetween(results["content_heatmap_percent"], 0.0, 100.0)
        for metric in ("consistency_cosine", "consistency_pearson"):
            self.assertBetween(results[metric], -1.0, 1.0)
        json.dumps(results)  # serialisable as metrics.json

    def test_matches_the_metric_functions(self):
        batch = next(iter(tiny_dataset(batch_size=NUM_IMAGES)))
        explained = self.model.explain(batch["image"], class_index=batch["label"])
        percent, valid = metrics.content_heatmap(explained["heatmap"], batch["bbox"])
        expected_ch = float(np.mean(percent.numpy()[valid.numpy()]))
        logits = self.model(batch["image"])
        expected_accuracy = float(np.mean(metrics.top1_accuracy(logits, batch["label"])))
        self.assertAllClose(self.results["content_heatmap_percent"], expected_ch, rtol=1e-5)
        self.assertAllClose(self.results["accuracy"], expected_accuracy)
        # Balanced accuracy: scikit-learn's on the same predictions.
        from sklearn.metrics import balanced_accuracy_score

        predictions = np.argmax(logits, axis=-1)
        self.assertAllClose(
            self.results["balanced_accuracy"],
            balanced_accuracy_score(batch["label"].numpy(), predictions),
        )

    def test_balanced_accuracy_weighs_classes_equally(self):
        # Class 0: 3 of 4 right; class 1: 0 of 1; class 2: 1 of 1 -> (0.75 + 0 + 1) / 3.
        correct = [1, 1, 0, 1, 0, 1]
        labels = [0, 0, 0, 0, 1, 2]
        self.assertAllClose(evaluation.balanced_accuracy(correct, labels), 1.75 / 3)
        self.assertIsNone(evaluation.balanced_accuracy([], []))

    def test_without_boxes_box_metrics_are_none(self):
        results = evaluation.evaluate_model(
            self.model, tiny_dataset(with_boxes=False), auc_steps=STEPS, progress=False
        )
        self.assertIsNone(results["content_heatmap_percent"])
        self.assertEqual(results["pointing_game_count"], 0)
        self.assertEqual(results["num_images"], NUM_IMAGES)
        self.assertAllClose(results["insertion_auc"], self.results["insertion_auc"], atol=1e-6)

    def test_max_images_and_max_batches(self):
        limited = evaluation.evaluate_model(
            self.model, tiny_dataset(), auc_steps=STEPS, max_images=5, progress=False
        )
        self.assertEqual(limited["num_images"], 5)
        one_batch = evaluation.evaluate_model(
            self.model, tiny_dataset(), auc_steps=STEPS, max_batches=1, progress=True
        )
        self.assertEqual(one_batch["num_images"], 4)

    def test_progress_hook_gets_each_metric_with_images_done_of_total(self):
        stages = [
            evaluation.GRADCAM_STAGE,
            evaluation.INSERTION_DELETION_STAGE,
            evaluation.CONSISTENCY_STAGE,
        ]
        calls = []
        evaluation.evaluate_model(
            self.model, tiny_dataset(), auc_steps=STEPS, dataset_size=NUM_IMAGES,
            progress=lambda *call: calls.append(call),
        )
        self.assertEqual(calls, [(s, 4, 6) for s in stages] + [(s, 6, 6) for s in stages])
        # Without dataset_size the total is bounded by max_images (or the batches).
        calls.clear()
        evaluation.evaluate_model(
            self.model, tiny_dataset(), auc_steps=STEPS, max_images=5,
            progress=lambda *call: calls.append(call),
        )
        self.assertEqual(calls, [(s, 4, 5) for s in stages] + [(s, 5, 5) for s in stages])
        calls.clear()
        evaluation.evaluate_consistency(
            {"a": self.model, "b": self.other}, tiny_dataset(), cgc_tf.PairedAugmentation(),
            progress=lambda *call: calls.append(call),
        )
        self.assertEqual(
            calls,
            [("a consistency", 4, 8), ("b consistency", 4, 8),
             ("a consistency", 6, 8), ("b consistency", 6, 8)],
        )
        with self.assertRaisesRegex(ValueError, "`progress` must be a bool or a callable"):
            evaluation.evaluate_model(self.model, tiny_dataset(), progress="yes")

    def test_progress_true_prints_the_final_line_with_seconds_per_metric(self):
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            evaluation.compare_models(
                self.model, self.other, tiny_dataset(), names=("a", "b"), auc_steps=STEPS,
                max_batches=1, progress=True,
            )
        self.assertRegex(
            output.getvalue(),
            r"Explanation metrics: 4 images in \d+ s \(a grad-cam \d+ s, "
            r"a insertion/deletion \d+ s, a consistency \d+ s, b grad-cam \d+ s, "
            r"b insertion/deletion \d+ s, b consistency \d+ s\)\n$",
        )

    def test_same_seed_same_results_and_plain_classifier_accepted(self):
        again = evaluation.evaluate_model(
            self.model.backbone, tiny_dataset(), auc_steps=STEPS, progress=False
        )
        for metric in evaluation.PER_IMAGE_METRICS:
            self.assertAllClose(again[metric], self.results[metric], atol=1e-6, msg=metric)

    def test_plain_classifier_with_another_target_layer(self):
        explainer = evaluation.Explainer(self.model.backbone, target_layer="conv1")
        self.assertEqual(explainer.model.target_layer, "conv1")
        results = evaluation.evaluate_model(
            explainer, tiny_dataset(), auc_steps=STEPS, progress=False
        )
        self.assertAllClose(results["accuracy"], self.results["accuracy"])
        self.assertNotAllClose(
            results["content_heatmap_percent"], self.results["content_heatmap_percent"]
        )
        with self.assertRaisesRegex(ValueError, "target_layer"):
            evaluation.Explainer(self.model, target_layer="conv1")

    def test_compare_uses_the_same_images_and_transforms(self):
        comparison = evaluation.compare_models(
            self.model, self.other, tiny_dataset(), names=("a", "b"), auc_steps=STEPS,
            progress=False,
        )
        other_alone = evaluation.evaluate_model(
            self.other, tiny_dataset(), auc_steps=STEPS, progress=False
        )
        for metric in evaluation.PER_IMAGE_METRICS:
            self.assertAllClose(comparison["models"]["a"][metric], self.results[metric], atol=1e-6)
            self.assertAllClose(comparison["models"]["b"][metric], other_alone[metric], atol=1e-6)
        cosine = comparison["difference"]["consistency_cosine"]
        self.assertAllClose(
            cosine["mean"], other_alone["consistency_cosine"] - self.results["consistency_cosine"]
        )
        self.assertEqual(cosine["count"], NUM_IMAGES)
        table = evaluation.comparison_table(comparison)
        for metric in evaluation.PER_IMAGE_METRICS:
            self.assertIn(metric, table)

    def test_comparing_a_model_with_itself_ties(self):
        comparison = evaluation.compare_models(
            self.model, self.model, tiny_dataset(), auc_steps=STEPS, progress=False
        )
        for metric, difference in comparison["difference"].items():
            self.assertEqual(difference["better"], "tie", metric)
            self.assertAllClose(difference["mean"], 0.0)

    def test_consistency_under_identity_transforms_is_one(self):
        # T = the whole image, never flipped: cam(T(x)) = T(cam(x)) exactly.
        identity = cgc_tf.PairedAugmentation(area_range=(1.0, 1.0), flip_probability=0.0)
        result = evaluation.evaluate_consistency(
            {"a": self.model}, tiny_dataset(), identity, max_images=5
        )["a"]
        self.assertEqual(result["count"], 5)
        self.assertAllClose(result["consistency_cosine"], 1.0, atol=1e-5)
        self.assertAllClose(result["consistency_pearson"], 1.0, atol=1e-5)

    def test_readable_errors(self):
        big = cgc_tf.CGCModel(testing_models.tiny_convnet(image_size=32))
        with self.assertRaisesRegex(ValueError, "image_size"):
            evaluation.evaluate_model(big, tiny_dataset(), auc_steps=STEPS, progress=False)
        with self.assertRaisesRegex(ValueError, "bbox"):
            evaluation.evaluate_model(
                self.model, tf.data.Dataset.from_tensors({"pixels": tf.zeros([1])}), progress=False
            )
        two_classes = cgc_tf.CGCModel(testing_models.tiny_convnet(IMAGE_SIZE, num_classes=2))
        with self.assertRaisesRegex(ValueError, "2 classes"):
            evaluation.evaluate_model(two_classes, tiny_dataset(), progress=False)
        with self.assertRaisesRegex(ValueError, "max_images"):
            evaluation.evaluate_model(self.model, tiny_dataset(), max_images=0, progress=False)
        with self.assertRaisesRegex(ValueError, "model"):
            evaluation.evaluate_model("model.keras", tiny_dataset(), progress=False)


def _run_binary(*flags):
    """Runs `python -m evaluate.main` from the repository root; returns the process."""
    return subprocess.run(
        [sys.executable, "-m", "evaluate.main", *flags],
        cwd=testing_processes.REPO,
        env=testing_processes.subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
class EvaluateBinaryTest(tf.test.TestCase):
    """cgc-evaluate end to end on tiny saved models and cluttered_digits at 32x32."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        from cgc_tf.data import cluttered_digits

        cls.root = tempfile.mkdtemp(prefix="cgc_evaluate_")
        cls.data_dir = os.path.join(cls.root, "tfds")
        # Prepared once here rather than in each subprocess.
        cluttered_digits.builder(data_dir=cls.data_dir, image_size=32)
        cls.model_dirs = []
        for name, seed in (("cgc", 0), ("baseline", 1)):
            model_dir = os.path.join(cls.root, name)
            os.makedirs(model_dir)
            backbone = testing_models.tiny_convnet(image_size=32, num_classes=10, seed=seed)
            cgc_tf.CGCModel(backbone).save(os.path.join(model_dir, "model.keras"))
            with open(os.path.join(model_dir, "config.json"), "w") as file:
                json.dump({"dataset": "cluttered_digits", "data_dir": cls.data_dir}, file)
            cls.model_dirs.append(model_dir)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def test_one_model_writes_metrics_and_grid_to_the_model_dir(self):
        model_dir = self.model_dirs[0]
        process = _run_binary(
            f"--model={model_dir}", "--dataset=cluttered_digits", "--image_size=32",
            "--max_images=16", "--batch_size=8", "--auc_steps=4", "--grid_images=3",
        )
        self.assertEqual(process.returncode, 0, process.stderr[-3000:])
        with open(os.path.join(model_dir, "metrics.json")) as file:
            results = json.load(file)
        self.assertEqual(results["num_images"], 16)
        self.assertBetween(results["content_heatmap_percent"], 0.0, 100.0)
        self.assertEqual(results["pointing_game_count"], 16)
        # Progress: the final line with the seconds of each metric.
        self.assertRegex(
            process.stdout, r"Explanation metrics: 16 images in \d+ s \(grad-cam \d+ s, "
            r"insertion/deletion \d+ s, consistency \d+ s\)\n"
        )
        self.assertFalse(os.path.exists(os.path.join(model_dir, "comparison.json")))
        with Image.open(os.path.join(model_dir, "grid.png")) as grid:
            self.assertEqual(grid.format, "PNG")

    def test_compare_writes_the_comparison_table(self):
        output_dir = os.path.join(self.root, "comparison")
        process = _run_binary(
            f"--model={self.model_dirs[0]}/model.keras", f"--compare={self.model_dirs[1]}",
            "--max_images=16", "--batch_size=8", "--auc_steps=4", "--grid_images=2",
            f"--output_dir={output_dir}",
        )
        self.assertEqual(process.returncode, 0, process.stderr[-3000:])
        with open(os.path.join(output_dir, "comparison.json")) as file:
            comparison = json.load(file)
        self.assertEqual(sorted(comparison["models"]), ["baseline", "cgc"])
        self.assertIn("consistency_cosine", comparison["difference"])
        self.assertIn("difference", process.stdout)
        for metric in evaluation.PER_IMAGE_METRICS:
            self.assertIn(metric, process.stdout)
        for name in ("metrics.json", "grid.png"):
            self.assertTrue(os.path.isfile(os.path.join(output_dir, name)), name)

    def test_protocols_are_recorded_and_paper_writes_beside_the_model(self):
        model_dir = self.model_dirs[1]
        process = _run_binary(
            f"--model={model_dir}", "--max_images=8", "--batch_size=8", "--auc_steps=4",
            "--grid_images=0", "--transform_min_area=0.5",
        )
        self.assertEqual(process.returncode, 0, process.stderr[-3000:])
        with open(os.path.join(model_dir, "metrics.json")) as file:
            results = json.load(file)
        self.assertEqual(results["protocol"], "cgc_tf")
        self.assertEqual(results["training_transform_area"], [0.5, 1.0])
        self.assertIn("consistency_cosine_training_transforms", results)
        process = _run_binary(
            f"--model={model_dir}", "--protocol=paper", "--max_images=8", "--batch_size=8",
        )
        self.assertEqual(process.returncode, 0, process.stderr[-3000:])
        with open(os.path.join(model_dir, "paper_protocol", "metrics.json")) as file:
            paper = json.load(file)
        self.assertEqual(paper["protocol"], "paper")
        self.assertEqual(paper["input_resize"], 32)  # the digits' canvas, no resampling
        self.assertEqual(paper["num_images"], 8)
        self.assertBetween(paper["content_heatmap_percent"], 0.0, 100.0)
        self.assertNotIn("training_transform_area", paper)  # config.json has none

    def test_any_keras_classifier_with_quality_metrics_and_curves(self):
        # A user's own Sequential classifier ending in a softmax, saved as .keras.
        keras.utils.set_random_seed(3)
        classifier = keras.Sequential(
            [
                keras.Input((32, 32, 3)),
                keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv"),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(10, activation="softmax", name="head"),
            ]
        )
        path = os.path.join(self.root, "user_classifier.keras")
        classifier.save(path)
        output_dir = os.path.join(self.root, "user_evaluation")
        process = _run_binary(
            f"--model={path}", "--dataset=cluttered_digits", f"--data_dir={self.data_dir}",
            "--max_images=8", "--batch_size=8", "--auc_steps=4", "--grid_images=2",
            "--quality_images=4", f"--output_dir={output_dir}",
        )
        self.assertEqual(process.returncode, 0, process.stderr[-3000:])
        with open(os.path.join(output_dir, "metrics.json")) as file:
            results = json.load(file)
        self.assertEqual(results["quality_images"], 4)
        self.assertBetween(results["sparseness_gini"], 0.0, 1.0)
        self.assertGreaterEqual(results["max_sensitivity"], 0.0)
        self.assertAlmostEqual(results["road_gap"], results["road_lerf"] - results["road_morf"])
        self.assertEqual(results["randomization_layers"], ["head", "conv"])
        self.assertLen(results["randomization_spearman"], 2)  # the two layers with weights
        for name in ("grid.png", "curves.png"):
            with Image.open(os.path.join(output_dir, name)) as image:
                self.assertEqual(image.format, "PNG")

    def test_bad_flags_give_readable_errors(self):
        process = _run_binary(f"--model={self.root}/missing", "--dataset=cluttered_digits")
        self.assertNotEqual(process.returncode, 0)
        self.assertIn("does not exist", process.stderr)
        process = _run_binary(f"--model={self.model_dirs[0]}", "--auc_steps=0")
        self.assertNotEqual(process.returncode, 0)
        self.assertIn("auc_steps", process.stderr)
        process = _run_binary(f"--model={self.root}", "--dataset=cluttered_digits")
        self.assertNotEqual(process.returncode, 0)
        self.assertIn("model.keras", process.stderr)


if __name__ == "__main__":
    tf.test.main()
