"""cgc_tf.export_verification: the comparison rule, and verifying tampered artefacts.

The artefacts under test are real SavedModels and ONNX models whose heatmaps
are scaled by a known factor 1 + delta, so their relative heatmap difference
from the Keras model is delta (the oracle) while every other output is exact.
"""

import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

import cgc_tf
from cgc_tf import export
from cgc_tf import export_verification as verification
from cgc_tf import serving
from tests import testing_base
from tests import testing_models

# Heatmap signatures of a SavedModel: each is checked at every verification batch size.
HEATMAP_SIGNATURES = ("explain", "explain_class", "explain_bytes", "explain_bytes_class")


class _ScaledHeatmaps(serving.ServingFunctions):
    """Serving functions whose heatmaps are off by the factor `1 + delta`."""

    def __init__(self, model, delta):
        super().__init__(model)
        self.delta = delta

    def _forward(self, images, class_index=None, heatmap_size=None):
        outputs = super()._forward(images, class_index, heatmap_size)
        outputs["heatmap"] = outputs["heatmap"] * (1.0 + self.delta)
        return outputs


class CompareTest(tf.test.TestCase):
    """The verification's comparison rule on hand-made outputs."""

    def setUp(self):
        super().setUp()
        heatmap = np.zeros([3, 2, 2], np.float32)
        heatmap[:, 0, 0] = [1.0, 2.0, 4.0]
        self.reference = {
            # Row 1 is a near tie between classes 0 and 1.
            "probabilities": np.array([[0.9, 0.1], [0.50001, 0.49999], [0.2, 0.8]], np.float32),
            "class_id": np.array([0, 0, 1], np.int32),
            "heatmap": heatmap,
        }

    def outputs(self, **changes):
        outputs = {name: value.copy() for name, value in self.reference.items()}
        for name, (row, value) in changes.items():
            outputs[name][row] = value
        return outputs

    def compare(self, outputs, tolerance=1e-4):
        return verification.compare(self.reference, outputs, tolerance, "x")

    def test_identical_outputs_pass(self):
        stats, failures = self.compare(self.outputs())
        self.assertEqual(failures, [])
        self.assertEqual(stats["heatmap"]["rows_compared"], 3)
        self.assertEqual(stats["heatmap"]["max_relative_diff"], 0.0)

    def test_class_flip_on_a_near_tie_skips_that_heatmap(self):
        heatmap = np.full([2, 2], 100.0, np.float32)
        stats, failures = self.compare(self.outputs(class_id=(1, 1), heatmap=(1, heatmap)))
        self.assertEqual(failures, [])
        self.assertEqual(stats["class_id"], {"mismatches": 0, "near_tie_flips": 1})
        self.assertEqual(stats["heatmap"]["rows_compared"], 2)

    def test_class_flip_on_a_clear_winner_fails(self):
        _, failures = self.compare(self.outputs(class_id=(0, 1)))
        self.assertEqual(failures, ["x/class_id: 1 mismatches outside near ties"])

    def test_heatmap_tolerance_is_relative_to_the_largest_value(self):
        heatmap = self.reference["heatmap"][2].copy()
        # Heatmaps: max(tolerance, HEATMAP_TOLERANCE = 1e-3) of the maximum 4.0.
        heatmap[1, 1] = 4.0 * 5e-4
        _, failures = self.compare(self.outputs(heatmap=(2, heatmap)))
        self.assertEqual(failures, [])
        heatmap[1, 1] = 4.0 * 2e-3
        stats, failures = self.compare(self.outputs(heatmap=(2, heatmap)))
        self.assertAllClose(stats["heatmap"]["max_relative_diff"], 2e-3)
        self.assertEqual(
            failures, ["x/heatmap: max difference relative to the heatmap maximum 0.002 > 0.001"]
        )
        # A larger tolerance applies to heatmaps too.
        _, failures = self.compare(self.outputs(heatmap=(2, heatmap)), tolerance=3e-3)
        self.assertEqual(failures, [])

    def test_probabilities_and_missing_outputs(self):
        probabilities = np.array([0.9 + 2e-4, 0.1], np.float32)
        _, failures = self.compare(self.outputs(probabilities=(0, probabilities)))
        self.assertLen(failures, 1)
        self.assertIn("x/probabilities: max abs difference", failures[0])
        outputs = self.outputs()
        del outputs["heatmap"]
        _, failures = self.compare(outputs)
        self.assertEqual(failures, ["x: outputs ['heatmap'] are missing"])

    def test_tiny_heatmaps_are_compared_in_absolute_terms(self):
        self.reference["heatmap"] *= 1e-9  # maximum 4e-9, below HEATMAP_SCALE_FLOOR
        heatmap = self.reference["heatmap"][2].copy()
        heatmap[0, 0] = 0.0  # off by 4e-9 absolute: 4e-3 of the floor
        stats, failures = self.compare(self.outputs(heatmap=(2, heatmap)))
        self.assertAllClose(stats["heatmap"]["max_relative_diff"], 4e-9 / 1e-6)
        self.assertLen(failures, 1)
        self.assertIn("x/heatmap", failures[0])

    def test_invalid_rows_must_match_and_are_not_compared(self):
        self.reference["valid"] = np.array([True, True, False])
        garbage = np.full([2, 2], 7.0, np.float32)
        stats, failures = self.compare(self.outputs(heatmap=(2, garbage)))
        self.assertEqual(failures, [])
        self.assertEqual(stats["heatmap"]["rows_compared"], 2)
        stats, failures = self.compare(self.outputs(valid=(2, True)))
        self.assertEqual(stats["valid"], {"mismatches": 1})
        self.assertEqual(failures, ["x/valid: 1 mismatches"])

    def test_tolerances_and_settings(self):
        self.assertEqual(verification.heatmap_tolerance(1e-4), verification.HEATMAP_TOLERANCE)
        self.assertEqual(verification.heatmap_tolerance(3e-3), 3e-3)
        settings = verification.settings(2e-4)
        self.assertEqual(settings["tolerance"], 2e-4)
        self.assertEqual(settings["verification_batch_sizes"], [1, 3])
        semantics = settings["tolerance_semantics"]
        self.assertIn(f"max(tolerance, {verification.HEATMAP_TOLERANCE})", semantics)


class VerifyArtefactsTest(testing_base.TestCase):
    """SavedModel / ONNX artefacts with heatmaps off by a known relative amount."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp(prefix="cgc_export_verification_test_")
        model = cgc_tf.CGCModel(testing_models.tiny_convnet(), target_layer="features")
        cls.model, cls.functions = model, serving.ServingFunctions(model)
        cls.metadata = {"class_names": ["a", "b", "c"], "image_size": 16}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def verify(self, delta, tolerance=verification.DEFAULT_TOLERANCE):
        """verify_saved_model's result for the SavedModel off by `delta` (written once)."""
        path = os.path.join(self.root, f"delta_{delta:g}")
        if not os.path.exists(path):
            export.write_saved_model(_ScaledHeatmaps(self.model, delta), self.metadata, path)
        return verification.verify_saved_model(
            path, self.model, self.functions, self.metadata, tolerance
        )

    def assertHeatmapDifferences(self, result, delta):
        for name in HEATMAP_SIGNATURES:
            differences = result["differences"][name]
            self.assertAllClose(differences["heatmap"]["max_relative_diff"], delta, atol=1e-6)
            self.assertGreater(differences["heatmap"]["rows_compared"], 0, name)
            # Only the heatmaps were changed.
            self.assertLessEqual(differences["probabilities"]["max_abs_diff"], 1e-6, name)
            self.assertEqual(differences["class_id"]["mismatches"], 0, name)

    def test_heatmaps_off_by_more_than_the_tolerance_fail(self):
        delta = 5 * verification.HEATMAP_TOLERANCE
        result = self.verify(delta)
        self.assertHeatmapDifferences(result, delta)
        expected = [
            f"saved_model/{name}/batch_{batch_size}/heatmap"
            for batch_size in verification.VERIFICATION_BATCH_SIZES
            for name in HEATMAP_SIGNATURES
        ]
        self.assertCountEqual([f.split(":")[0] for f in result["failures"]], expected)
        for failure in result["failures"]:
            self.assertIn(f"0.005 > {verification.HEATMAP_TOLERANCE:g}", failure)
        # The same artefact passes when the caller allows that much.
        self.assertEqual(self.verify(delta, tolerance=2 * delta)["failures"], [])

    def test_float32_cancellation_level_passes(self):
        # Twice the default tolerance, the order of the summation-order differences
        # of exported kernels: accepted for heatmaps (HEATMAP_TOLERANCE), though
        # the same absolute difference would fail for probabilities.
        delta = 2 * verification.DEFAULT_TOLERANCE
        result = self.verify(delta)
        self.assertEqual(result["failures"], [])
        self.assertHeatmapDifferences(result, delta)
        self.assertEqual(result["differences"]["explain_bytes"]["valid"], {"mismatches": 0})
        self.assertEqual(
            result["signatures"]["explain"]["outputs"]["heatmap"],
            {"dtype": "float32", "shape": [None, None, None]},
        )

    def test_onnx_heatmaps_off_by_more_than_the_tolerance_fail(self):
        delta = 5 * verification.HEATMAP_TOLERANCE
        path = os.path.join(self.root, "scaled.onnx")
        metadata = dict(self.metadata, heatmap_method="closed_form", target_layer="features")
        export.write_onnx(_ScaledHeatmaps(self.model, delta), metadata, path)
        result = verification.verify_onnx(
            path, self.model, self.functions, None, verification.DEFAULT_TOLERANCE
        )
        heatmap = result["differences"]["heatmap"]
        self.assertAllClose(heatmap["max_relative_diff"], delta, atol=1e-6)
        self.assertLessEqual(result["differences"]["probabilities"]["max_abs_diff"], 1e-6)
        self.assertCountEqual(
            [failure.split(":")[0] for failure in result["failures"]],
            [f"onnx/explain/batch_{n}/heatmap" for n in verification.VERIFICATION_BATCH_SIZES],
        )
        self.assertEqual(result["inputs"]["images"]["shape"], [None, None, None, 3])
        self.assertIn("class_names", result["metadata_props"])
        loose = verification.verify_onnx(path, self.model, self.functions, None, 2 * delta)
        self.assertEqual(loose["failures"], [])

    def test_report_message_and_summary_list_the_failures(self):
        report = {
            "passed": False,
            "version": 2,
            "export_dir": "/srv/cgc",
            "heatmap_method": "closed_form",
            "target_layer": "features",
            "num_classes": 3,
            "image_size": 16,
            "saved_model": self.verify(5 * verification.HEATMAP_TOLERANCE),
        }
        report["failures"] = report["saved_model"].pop("failures")
        message = verification.failure_message(report, 1e-4)
        self.assertStartsWith(message, "export verification failed (tolerance=0.0001)")
        self.assertIn("nothing was moved into '/srv/cgc'", message)
        self.assertIn("  - saved_model/explain/batch_1/heatmap", message)
        summary = verification.format_summary(report)
        self.assertStartsWith(summary, "export FAILED: version 2 in /srv/cgc")
        self.assertIn("SavedModel (not moved): 7 signatures", summary)
        self.assertIn("max relative heatmap diff 0.005", summary)
        self.assertIn("  failure: saved_model/explain_bytes_class/batch_3/heatmap", summary)


if __name__ == "__main__":
    tf.test.main()
