"""The `cgc-export` binary (export/main.py) on a saved model."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

import cgc_tf
from cgc_tf import config
from export import main as export_main
from tests import testing_models

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ExportBinaryTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp(prefix="cgc_export_binary_test_")
        cls.model_dir = os.path.join(cls.root, "run")
        os.makedirs(cls.model_dir)
        model = cgc_tf.CGCModel(testing_models.tiny_convnet(), target_layer="features")
        model.save(os.path.join(cls.model_dir, "model.keras"))
        with open(os.path.join(cls.model_dir, "config.json"), "w") as f:
            f.write(config.TrainConfig(image_size=16).to_json())
        cls.class_names_file = os.path.join(cls.root, "classes.txt")
        with open(cls.class_names_file, "w") as f:
            f.write("cat\ndog\nbird\n")
        # The binary's flags are parsed once per process; absl needs that
        # before flagsaver can set them in the in-process tests.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS(["export_binary_test"])

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def assertExported(self, export_dir, version, stdout):
        self.assertIn(f"export passed: version {version} in {export_dir}", stdout)
        self.assertIn("heatmaps: closed_form (target layer 'features')", stdout)
        self.assertIn("ONNX", stdout)
        self.assertTrue(os.path.isfile(os.path.join(export_dir, str(version), "saved_model.pb")))
        self.assertTrue(os.path.isfile(os.path.join(export_dir, "model.onnx")))
        with open(os.path.join(export_dir, "export_report.json")) as f:
            report = json.load(f)
        self.assertTrue(report["passed"])
        self.assertEqual(report["version"], version)
        self.assertEqual(report["class_names"], ["cat", "dog", "bird"])
        with open(os.path.join(export_dir, str(version), "assets.extra", "metadata.json")) as f:
            return json.load(f)

    def test_main_exports_a_keras_file(self):
        keras_file = os.path.join(self.model_dir, "model.keras")
        stdout = io.StringIO()
        with flagsaver.flagsaver(
            model=keras_file, class_names_file=self.class_names_file, version=2
        ), contextlib.redirect_stdout(stdout):
            export_main.main(["cgc-export"])
        metadata = self.assertExported(
            os.path.join(self.model_dir, "export"), 2, stdout.getvalue()
        )
        self.assertEqual(metadata["extra"]["source"], keras_file)

    @pytest.mark.slow
    def test_console_run_on_a_model_dir(self):
        export_dir = os.path.join(self.root, "served")
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "export.main",
                f"--model_dir={self.model_dir}",
                f"--export_dir={export_dir}",
                f"--class_names_file={self.class_names_file}",
                "--version=3",
                "--opset=18",
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=REPO_ROOT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        metadata = self.assertExported(export_dir, 3, result.stdout)
        self.assertEqual(metadata["extra"]["training_config"]["image_size"], 16)

    def test_missing_onnx_batch_size_fails_before_writing(self):
        model = cgc_tf.CGCModel(testing_models.tiny_convnet_flatten_head(), target_layer="features")
        model_dir = os.path.join(self.root, "flatten_run")
        os.makedirs(model_dir)
        model.save(os.path.join(model_dir, "model.keras"))
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            f.write(config.TrainConfig(image_size=16).to_json())
        with flagsaver.flagsaver(model=model_dir):
            with self.assertRaisesRegex(SystemExit, r"(?s)cgc-export: .*--onnx_batch_size"):
                export_main.main(["cgc-export"])
        self.assertFalse(os.path.exists(os.path.join(model_dir, "export")))

    def test_bad_flags_fail_clearly(self):
        with flagsaver.flagsaver(model=os.path.join(self.root, "missing")):
            with self.assertRaisesRegex(SystemExit, r"must be a '.keras' file or a model_dir"):
                export_main.main(["cgc-export"])
        with flagsaver.flagsaver(model=self.model_dir, formats=["onnx", "tflite"], opset=3):
            with self.assertRaisesRegex(
                SystemExit, r"(?s)formats=\('onnx', 'tflite'\).*opset=3 must be"
            ):
                export_main.main(["cgc-export"])
        with self.assertRaisesRegex(Exception, r"unexpected arguments \['extra'\]"):
            export_main.main(["cgc-export", "extra"])
        with flagsaver.flagsaver(model=self.model_dir, model_dir=self.model_dir):
            with self.assertRaisesRegex(Exception, r"exactly one of --model_dir .* or --model"):
                export_main.main(["cgc-export"])
        keras_file = os.path.join(self.model_dir, "model.keras")
        with flagsaver.flagsaver(model_dir=keras_file):
            with self.assertRaisesRegex(Exception, r"--model_dir='.*model.keras' is not a dir"):
                export_main.main(["cgc-export"])


if __name__ == "__main__":
    tf.test.main()
