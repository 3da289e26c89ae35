"""cgc_tf.export: SavedModel + ONNX artefacts, verification, metadata, report.

Each test class exports one tiny model once (setUpClass) and checks the
artefacts against `CGCModel.explain` (GradientTape Grad-CAM) as the oracle.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import keras
import numpy as np
import onnx
import onnxruntime
import tensorflow as tf

import cgc_tf
from cgc_tf import export
from cgc_tf import gradcam
from tests import testing_models

CLASS_NAMES = ["cat", "dog", "bird"]
SIGNATURES = {
    "serving_default",
    "explain",
    "explain_class",
    "serving_bytes",
    "explain_bytes",
    "explain_bytes_class",
    "metadata",
}


def _images(batch_size, size=16, seed=0):
    return np.random.default_rng(seed).random((batch_size, size, size, 3), dtype=np.float32)


def _normalized_convnet(image_size=16, num_classes=3):
    """tiny_convnet behind a Normalization layer, as every cgc_tf backbone has.

    Its mean and variance are constants captured by the serving functions,
    which tf2onnx would otherwise turn into extra ONNX inputs.
    """
    keras.utils.set_random_seed(0)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Normalization(mean=[0.5, 0.4, 0.3], variance=[0.1, 0.2, 0.3])(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="conv2")(x)
    x = keras.layers.Activation("relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name="normalized_convnet")


def _mlp_head_backbone(image_size=16):
    """GAP -> Dense(relu) -> Dense: no closed form, and ReluGrad has no ONNX conversion."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="conv1")(inputs)
    x = keras.layers.Activation("relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(5, activation="relu", name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x), name="tiny_mlp_head")


class _ExportTestCase(tf.test.TestCase):
    """Shares one temporary folder per class."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp(prefix="cgc_export_test_")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def assertHeatmapsClose(self, actual, expected, relative=1e-4):
        """Heatmaps have an arbitrary scale: compare relative to the largest value."""
        expected = np.asarray(expected)
        self.assertGreater(float(np.max(expected)), 0.0)
        self.assertAllClose(actual, expected, atol=relative * float(np.max(expected)), rtol=0)


class ClosedFormExportTest(_ExportTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = cgc_tf.CGCModel(_normalized_convnet(), target_layer="features")
        cls.export_dir = os.path.join(cls.root, "export")
        cls.report = export.export_model(cls.model, cls.export_dir, class_names=CLASS_NAMES)
        cls.saved_model_dir = os.path.join(cls.export_dir, "1")
        cls.onnx_path = os.path.join(cls.export_dir, "model.onnx")

    def test_layout_and_nothing_left_in_staging(self):
        self.assertCountEqual(
            os.listdir(self.export_dir), ["1", "model.onnx", "export_report.json"]
        )
        self.assertTrue(os.path.isfile(os.path.join(self.saved_model_dir, "saved_model.pb")))
        self.assertTrue(
            os.path.isfile(os.path.join(self.saved_model_dir, "assets.extra", "metadata.json"))
        )

    def test_report_file(self):
        with open(os.path.join(self.export_dir, "export_report.json")) as f:
            report = json.load(f)
        self.assertEqual(report, json.loads(json.dumps(self.report)))
        self.assertTrue(report["passed"])
        self.assertEqual(report["failures"], [])
        self.assertTrue(report["closed_form"])
        self.assertEqual(report["heatmap_method"], "closed_form")
        self.assertEqual(report["class_names"], CLASS_NAMES)
        self.assertEqual(report["onnx"]["opset"], 17)
        self.assertEqual(report["onnx"]["batch_size"], "dynamic")
        self.assertEqual(report["version"], 1)
        self.assertEqual(report["tolerance"], 1e-4)
        for package in ("cgc_tf", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime"):
            self.assertIn(package, report["versions"])
        self.assertEqual(set(report["saved_model"]["signatures"]), SIGNATURES)
        explain = report["saved_model"]["signatures"]["explain_class"]
        self.assertEqual(
            explain["inputs"],
            {
                "images": {"dtype": "float32", "shape": [None, None, None, None]},
                "class_index": {"dtype": "int32", "shape": [None]},
            },
        )
        self.assertEqual(
            explain["outputs"]["heatmap"], {"dtype": "float32", "shape": [None, None, None]}
        )
        self.assertEqual(
            report["saved_model"]["signatures"]["explain_bytes"]["outputs"]["valid"],
            {"dtype": "bool", "shape": [None]},
        )
        # Only the images: no captured constant became an input.
        self.assertEqual(
            report["onnx"]["inputs"],
            {"images": {"dtype": "tensor(float)", "shape": [None, None, None, 3]}},
        )
        self.assertCountEqual(report["onnx"]["outputs"], ["probabilities", "class_id", "heatmap"])
        for name, differences in report["saved_model"]["differences"].items():
            self.assertLessEqual(differences["probabilities"]["max_abs_diff"], 1e-4, name)
            if "heatmap" in differences:
                self.assertLessEqual(differences["heatmap"]["max_relative_diff"], 1e-4, name)
                self.assertGreater(differences["heatmap"]["rows_compared"], 0, name)
        self.assertLessEqual(report["onnx"]["differences"]["heatmap"]["max_relative_diff"], 1e-4)
        self.assertIn("passed", export.format_summary(report))

    def test_metadata_in_both_artefacts(self):
        with open(os.path.join(self.saved_model_dir, "assets.extra", "metadata.json")) as f:
            metadata = json.load(f)
        self.assertEqual(metadata["class_names"], CLASS_NAMES)
        self.assertEqual(metadata["image_size"], 16)
        self.assertEqual(metadata["target_layer"], "features")
        self.assertEqual(metadata["cgc_tf_version"], cgc_tf.__version__)
        self.assertIn("images", metadata["preprocessing"])
        loaded = tf.saved_model.load(self.saved_model_dir)
        stored = json.loads(loaded.signatures["metadata"]()["metadata_json"].numpy())
        self.assertEqual(stored, metadata)
        props = {p.key: p.value for p in onnx.load(self.onnx_path).metadata_props}
        self.assertEqual(json.loads(props["class_names"]), CLASS_NAMES)
        self.assertEqual(props["target_layer"], "features")
        self.assertEqual(props["cgc_tf_version"], cgc_tf.__version__)
        self.assertEqual(props["image_size"], "16")
        self.assertEqual(props["onnx_batch_size"], "dynamic")
        self.assertIn("images", json.loads(props["preprocessing"]))

    def test_onnx_dynamic_batch_matches_keras(self):
        session = onnxruntime.InferenceSession(self.onnx_path, providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        for batch_size in (1, 7):
            images = _images(batch_size, seed=batch_size)
            outputs = dict(zip(names, session.run(None, {"images": images})))
            expected = self.model.explain(images)
            self.assertAllClose(outputs["probabilities"], expected["probabilities"], atol=1e-5)
            self.assertAllEqual(outputs["class_id"], expected["class_id"])
            self.assertHeatmapsClose(outputs["heatmap"], expected["heatmap"])

    def test_onnx_rejects_wrong_channels(self):
        session = onnxruntime.InferenceSession(self.onnx_path, providers=["CPUExecutionProvider"])
        with self.assertRaisesRegex(Exception, r"(?s)input: images.*index: 3 Got: 4 Expected: 3"):
            session.run(None, {"images": np.zeros([1, 16, 16, 4], np.float32)})

    def test_heatmap_at_input_resolution_for_other_sizes(self):
        loaded = tf.saved_model.load(self.saved_model_dir)
        images = _images(2, size=24)[:, :20]  # 20 x 24, resized to 16 x 16 inside
        outputs = loaded.signatures["explain"](images=tf.constant(images))
        self.assertEqual(outputs["heatmap"].shape, (2, 20, 24))
        resized = tf.image.resize(images, [16, 16])
        features, logits = self.model.extractor(resized)
        class_id = tf.argmax(logits, axis=-1, output_type=tf.int32)
        dense = gradcam.pooling_dense_head(self.model.backbone, "features")
        expected = gradcam.upsample(
            gradcam.closed_form_cam(features, dense.kernel, class_id), (20, 24)
        )
        self.assertAllEqual(outputs["class_id"], class_id)
        self.assertHeatmapsClose(outputs["heatmap"], expected)

    def test_saved_model_in_fresh_process_without_cgc_tf(self):
        images = _images(3, seed=5)
        class_index = np.array([2, -1, 0], np.int32)
        encoded = [tf.io.encode_png(tf.cast(image * 255, tf.uint8)).numpy() for image in images]
        np.savez(os.path.join(self.root, "inputs.npz"), images=images, class_index=class_index)
        for i, data in enumerate(encoded):
            with open(os.path.join(self.root, f"{i}.png"), "wb") as f:
                f.write(data)
        script = textwrap.dedent(
            f"""
            import json, sys
            import numpy as np
            import tensorflow as tf
            inputs = np.load({os.path.join(self.root, "inputs.npz")!r})
            loaded = tf.saved_model.load({self.saved_model_dir!r})
            encoded = [open({self.root!r} + f"/{{i}}.png", "rb").read() for i in range(3)]
            results = {{
                "explain": loaded.signatures["explain"](images=tf.constant(inputs["images"])),
                "explain_class": loaded.signatures["explain_class"](
                    images=tf.constant(inputs["images"]),
                    class_index=tf.constant(inputs["class_index"])),
                "serving_default": loaded.signatures["serving_default"](
                    images=tf.constant(inputs["images"])),
                "explain_bytes": loaded.signatures["explain_bytes"](
                    image_bytes=tf.constant(encoded + [b"garbage"])),
            }}
            assert "cgc_tf" not in sys.modules, "the SavedModel needed cgc_tf"
            print(json.dumps({{name: {{k: v.numpy().tolist() for k, v in out.items()}}
                              for name, out in results.items()}}))
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.root,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        outputs = json.loads(result.stdout.strip().splitlines()[-1])
        expected = self.model.explain(images)
        self.assertAllClose(outputs["serving_default"]["probabilities"], expected["probabilities"])
        self.assertAllClose(outputs["explain"]["probabilities"], expected["probabilities"])
        self.assertAllEqual(outputs["explain"]["class_id"], expected["class_id"])
        self.assertHeatmapsClose(outputs["explain"]["heatmap"], expected["heatmap"])
        resolved = np.where(class_index < 0, expected["class_id"], class_index)
        self.assertHeatmapsClose(
            outputs["explain_class"]["heatmap"], self.model.explain(images, resolved)["heatmap"]
        )
        self.assertEqual(outputs["explain_bytes"]["valid"], [True, True, True, False])
        self.assertEqual(outputs["explain_bytes"]["class_id"][-1], -1)
        self.assertEqual(np.asarray(outputs["explain_bytes"]["heatmap"]).shape, (4, 16, 16))

    def test_existing_version_is_not_overwritten(self):
        with self.assertRaisesRegex(FileExistsError, r"already exists.*overwrite=True"):
            export.export_model(self.model, self.export_dir, version=1)

    def test_invalid_arguments_are_listed_together(self):
        with self.assertRaises(ValueError) as context:
            export.export_model(
                self.model,
                os.path.join(self.root, "never"),
                version=-1,
                class_names=["a"],
                formats=("tflite",),
                tolerance=0,
            )
        message = str(context.exception)
        expected = ("version=-1", "formats=('tflite',)", "tolerance=0", "class_names must be 3")
        for part in expected:
            self.assertIn(part, message)
        with self.assertRaisesRegex(ValueError, r"opset=9 must be an integer in \[13, "):
            export.export_model(self.model, os.path.join(self.root, "never"), opset=9)
        self.assertFalse(os.path.exists(os.path.join(self.root, "never")))

    def test_rejects_models_that_are_not_cgc_models(self):
        with self.assertRaisesRegex(ValueError, r"must be a cgc_tf.CGCModel, got Functional"):
            export.export_model(testing_models.tiny_convnet(), os.path.join(self.root, "never"))

    def test_verification_failure_moves_nothing(self):
        export_dir = os.path.join(self.root, "strict")
        # onnxruntime's float32 arithmetic differs from TensorFlow's by ~1e-8.
        with self.assertRaisesRegex(
            export.VerificationError, r"onnx/explain/batch_\d/(probabilities|heatmap)"
        ):
            export.export_model(self.model, export_dir, formats=("onnx",), tolerance=1e-12)
        self.assertEqual(os.listdir(export_dir), ["export_report.json"])
        with open(os.path.join(export_dir, "export_report.json")) as f:
            report = json.load(f)
        self.assertFalse(report["passed"])
        self.assertNotEqual(report["failures"], [])


class GradientTapeExportTest(_ExportTestCase):
    """A Flatten -> Dense head: GradientTape heatmaps, static-batch ONNX."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        backbone = testing_models.tiny_convnet_flatten_head()
        cls.model = cgc_tf.CGCModel(backbone, target_layer="features")
        cls.export_dir = os.path.join(cls.root, "export")
        cls.report = export.export_model(cls.model, cls.export_dir, onnx_batch_size=2)

    def test_report(self):
        self.assertTrue(self.report["passed"])
        self.assertFalse(self.report["closed_form"])
        self.assertEqual(self.report["heatmap_method"], "gradient_tape")
        self.assertEqual(self.report["onnx"]["batch_size"], 2)
        self.assertEqual(self.report["onnx"]["inputs"]["images"]["shape"], [2, None, None, 3])

    def test_static_batch_onnx_matches_keras(self):
        session = onnxruntime.InferenceSession(
            os.path.join(self.export_dir, "model.onnx"), providers=["CPUExecutionProvider"]
        )
        names = [output.name for output in session.get_outputs()]
        images = _images(2, seed=3)
        outputs = dict(zip(names, session.run(None, {"images": images})))
        expected = self.model.explain(images)
        self.assertAllClose(outputs["probabilities"], expected["probabilities"], atol=1e-5)
        self.assertHeatmapsClose(outputs["heatmap"], expected["heatmap"])

    def test_saved_model_keeps_dynamic_batch(self):
        loaded = tf.saved_model.load(os.path.join(self.export_dir, "1"))
        for batch_size in (1, 5):
            images = _images(batch_size, seed=batch_size)
            class_index = np.full([batch_size], 1, np.int32)
            outputs = loaded.signatures["explain_class"](
                images=tf.constant(images), class_index=tf.constant(class_index)
            )
            expected = self.model.explain(images, class_index)
            self.assertAllClose(outputs["probabilities"], expected["probabilities"], atol=1e-5)
            self.assertHeatmapsClose(outputs["heatmap"], expected["heatmap"])

    def test_missing_onnx_batch_size_is_a_clear_error(self):
        export_dir = os.path.join(self.root, "no_batch")
        with self.assertRaisesRegex(
            ValueError, r"onnx_batch_size is required.*'features'.*--onnx_batch_size"
        ):
            export.export_model(self.model, export_dir)
        self.assertFalse(os.path.exists(export_dir))

    def test_unconvertible_head_names_the_ops(self):
        model = cgc_tf.CGCModel(_mlp_head_backbone(), target_layer="features")
        export_dir = os.path.join(self.root, "mlp")
        with self.assertRaisesRegex(ValueError, r"TensorFlow ops \['ReluGrad'\].*saved_model"):
            export.export_model(model, export_dir, formats=("onnx",), onnx_batch_size=2)
        self.assertEqual(os.listdir(export_dir), [])


class LoadingTest(_ExportTestCase):
    def test_load_model_from_file_and_model_dir(self):
        model = cgc_tf.CGCModel(testing_models.tiny_convnet(), target_layer="features")
        model_dir = os.path.join(self.root, "run")
        os.makedirs(model_dir)
        model.save(os.path.join(model_dir, "model.keras"))
        for path in (model_dir, os.path.join(model_dir, "model.keras")):
            loaded = export.load_model(path)
            self.assertIsInstance(loaded, cgc_tf.CGCModel)
            self.assertEqual(loaded.target_layer, "features")
        self.assertEqual(export.default_export_dir(model_dir), os.path.join(model_dir, "export"))
        self.assertEqual(
            export.default_export_dir(os.path.join(model_dir, "model.keras")),
            os.path.join(model_dir, "export"),
        )

    def test_load_model_errors(self):
        with self.assertRaisesRegex(ValueError, r"must be a '.keras' file or a model_dir"):
            export.load_model(self.root)
        path = os.path.join(self.root, "plain.keras")
        testing_models.tiny_convnet().save(path)
        with self.assertRaisesRegex(ValueError, r"not a cgc_tf.CGCModel"):
            export.load_model(path)

    def test_read_class_names(self):
        path = os.path.join(self.root, "names.txt")
        with open(path, "w") as f:
            f.write("cat\n\n dog \nbird\n")
        self.assertEqual(export.read_class_names(path), ["cat", "dog", "bird"])


if __name__ == "__main__":
    tf.test.main()
