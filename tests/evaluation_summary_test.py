"""Tests of cgc_tf/evaluation_summary.py against hand-computed means, counts and differences."""

import math

import numpy as np
import tensorflow as tf

from cgc_tf import evaluation_summary

NAN = float("nan")


def _per_image(**values):
    """A per-image dict of every metric: the given lists, others all NaN (3 images)."""
    return {
        metric: np.asarray(values.get(metric, [NAN, NAN, NAN]), np.float32)
        for metric in evaluation_summary.PER_IMAGE_METRICS
    }


class SummarizeTest(tf.test.TestCase):
    def test_means_skip_nan_and_counts_the_rest(self):
        per_image = {metric: [] for metric in evaluation_summary.PER_IMAGE_METRICS}
        # Two batches, as cgc_tf.evaluation appends them.
        per_image["accuracy"] = [np.array([1, 0], np.float32), np.array([1], np.float32)]
        per_image["content_heatmap_percent"] = [
            np.array([50, NAN], np.float32), np.array([80], np.float32)
        ]
        result = evaluation_summary.summarize(per_image, np.array([0, 1, 1]), 3, skipped=1)
        self.assertAllClose(result["accuracy"], 2 / 3)
        self.assertEqual(result["accuracy_count"], 3)
        self.assertAllClose(result["content_heatmap_percent"], 65.0)
        self.assertEqual(result["content_heatmap_percent_count"], 2)
        self.assertIsNone(result["pointing_game"])
        self.assertEqual(result["pointing_game_count"], 0)
        # Class 0: 1 of 1 right; class 1: 1 of 2 -> (1 + 0.5) / 2.
        self.assertAllClose(result["balanced_accuracy"], 0.75)
        self.assertEqual(result["content_heatmap_skipped"], 1)
        self.assertEqual(result["num_images"], 3)


class PairedDifferencesTest(tf.test.TestCase):
    def test_paired_over_common_images_with_direction_and_standard_error(self):
        first = _per_image(
            insertion_auc=[0.2, 0.4, 0.6],
            deletion_auc=[0.5, 0.5, 0.5],
            content_heatmap_percent=[10, NAN, 30],
            accuracy=[1, 1, 1],
        )
        second = _per_image(
            insertion_auc=[0.3, 0.6, 0.6],
            deletion_auc=[0.6, 0.7, 0.8],
            content_heatmap_percent=[20, 50, NAN],
            accuracy=[1, 1, 1],
        )
        difference = evaluation_summary.paired_differences(first, second, ("a", "b"))
        deltas = np.array([0.1, 0.2, 0.0])
        insertion = difference["insertion_auc"]
        self.assertAllClose(insertion["mean"], deltas.mean())
        self.assertAllClose(insertion["standard_error"], deltas.std(ddof=1) / math.sqrt(3))
        self.assertEqual((insertion["count"], insertion["better"]), (3, "b"))
        # Deletion: lower is better, so the larger second model loses.
        self.assertAllClose(difference["deletion_auc"]["mean"], 0.2)
        self.assertEqual(difference["deletion_auc"]["better"], "a")
        # CH: only image 0 has both values; one image gives no standard error.
        ch = difference["content_heatmap_percent"]
        self.assertEqual((ch["mean"], ch["count"], ch["standard_error"]), (10.0, 1, None))
        self.assertEqual(difference["accuracy"]["better"], "tie")
        # Metrics measured on no common image are left out.
        self.assertNotIn("pointing_game", difference)

    def test_table_lists_every_metric_and_the_better_model(self):
        first = _per_image(insertion_auc=[0.2, 0.4, 0.6])
        second = _per_image(insertion_auc=[0.3, 0.6, 0.6])
        summary = {"insertion_auc": 0.4, "insertion_auc_count": 3}
        comparison = {
            "models": {
                "a": {metric: None for metric in evaluation_summary.PER_IMAGE_METRICS} | summary,
                "b": {metric: None for metric in evaluation_summary.PER_IMAGE_METRICS}
                | {"insertion_auc": 0.5},
            },
            "difference": evaluation_summary.paired_differences(first, second, ("a", "b")),
        }
        lines = evaluation_summary.comparison_table(comparison).splitlines()
        self.assertEqual(len(lines), 2 + len(evaluation_summary.PER_IMAGE_METRICS))
        insertion = next(line for line in lines if line.startswith("insertion_auc"))
        self.assertEqual(
            insertion.split(), ["insertion_auc", "0.4000", "0.5000", "+0.1000", "0.0577", "3", "b"]
        )


if __name__ == "__main__":
    tf.test.main()
