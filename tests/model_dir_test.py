"""cgc_tf.model_dir: atomic writes keep the old file whole on failure; names; loading rule."""

import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import tensorflow as tf

import cgc_tf
from cgc_tf import model_dir
from tests import testing_models
from tests.testing_base import temporary_directory as _temporary_directory


class _Interrupted(BaseException):
    """Stands for the process dying in the middle of a write."""


class WriteJsonTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.directory = _temporary_directory(self)
        self.path = os.path.join(self.directory, "config.json")

    def read(self):
        with open(self.path, encoding="utf-8") as f:
            return f.read()

    def test_writes_indented_sorted_json_with_numpy_scalars(self):
        model_dir.write_json(self.path, {"b": np.float32(0.5), "a": [np.int64(3)]})
        self.assertEqual(self.read(), '{\n  "a": [\n    3\n  ],\n  "b": 0.5\n}\n')
        self.assertEqual(os.listdir(self.directory), ["config.json"])

    def test_creates_missing_directories(self):
        path = os.path.join(self.directory, "input_stats", "worker-0.json")
        model_dir.write_json(path, {"decoded": 1})
        with open(path, encoding="utf-8") as f:
            self.assertEqual(json.load(f), {"decoded": 1})

    def test_failure_mid_write_leaves_the_old_file_intact(self):
        model_dir.write_json(self.path, {"epoch": 1})
        old = self.read()

        def die_before_rename(temporary_path, path):
            # The new text is complete in the temporary file; the rename never happens.
            with open(temporary_path, encoding="utf-8") as f:
                self.assertEqual(json.load(f), {"epoch": 2})
            raise _Interrupted(path)

        with mock.patch.object(model_dir, "_commit", die_before_rename):
            with self.assertRaises(_Interrupted):
                model_dir.write_json(self.path, {"epoch": 2})
        self.assertEqual(self.read(), old)

    def test_error_while_writing_leaves_the_old_file_and_no_partial_file(self):
        model_dir.write_json(self.path, {"epoch": 1})
        with self.assertRaises(_Interrupted):
            with model_dir.atomic_write_path(self.path) as temporary_path:
                with open(temporary_path, "w") as f:
                    f.write('{"epo')
                raise _Interrupted(temporary_path)
        self.assertEqual(json.loads(self.read()), {"epoch": 1})
        self.assertEqual(os.listdir(self.directory), ["config.json"])

    def test_kill_mid_write_leaves_the_old_file_intact(self):
        model_dir.write_json(self.path, {"epoch": 1})
        # A process killed (os._exit: no clean-up runs) while the new file is half written.
        script = (
            "import os, sys\n"
            "from cgc_tf import model_dir\n"
            "with model_dir.atomic_write_path(sys.argv[1]) as temporary_path:\n"
            "    with open(temporary_path, 'w') as f:\n"
            "        f.write('{\"epo')\n"
            "        f.flush()\n"
            "        os._exit(9)\n"
        )
        result = subprocess.run([sys.executable, "-c", script, self.path], check=False)
        self.assertEqual(result.returncode, 9)
        self.assertEqual(json.loads(self.read()), {"epoch": 1})
        # The leftover temporary file is deleted by the next write, which succeeds.
        self.assertCountEqual(os.listdir(self.directory), ["config.json", "config.partial.json"])
        model_dir.write_json(self.path, {"epoch": 2})
        self.assertEqual(json.loads(self.read()), {"epoch": 2})
        self.assertEqual(os.listdir(self.directory), ["config.json"])

    def test_unserialisable_value_leaves_the_old_file_intact(self):
        model_dir.write_json(self.path, {"epoch": 1})
        with self.assertRaisesRegex(TypeError, "object is not JSON serialisable"):
            model_dir.write_json(self.path, {"epoch": object()})
        self.assertEqual(json.loads(self.read()), {"epoch": 1})
        self.assertEqual(os.listdir(self.directory), ["config.json"])

    def test_atomic_write_path_keeps_the_suffix_for_keras(self):
        path = os.path.join(self.directory, "checkpoints", "last_epoch.keras")
        with model_dir.atomic_write_path(path) as temporary_path:
            self.assertEqual(
                temporary_path,
                os.path.join(self.directory, "checkpoints", "last_epoch.partial.keras"),
            )
            with open(temporary_path, "w") as f:
                f.write("model")
        with open(path) as f:
            self.assertEqual(f.read(), "model")


class NamesTest(tf.test.TestCase):
    def test_layout(self):
        self.assertEqual(model_dir.MODEL_FILE, "model.keras")
        self.assertEqual(model_dir.CONFIG_FILE, "config.json")
        self.assertEqual(model_dir.METRICS_FILE, "metrics.json")
        self.assertEqual(model_dir.BACKUP_DIR, os.path.join("checkpoints", "backup"))
        self.assertEqual(model_dir.MULTI_WORKER_DIR, os.path.join("checkpoints", "multi_worker"))
        self.assertEqual(
            model_dir.EPOCH_MODEL_FILE, os.path.join("checkpoints", "last_epoch.keras")
        )
        self.assertEqual(
            model_dir.input_stats_file(3), os.path.join("input_stats", "worker-3.json")
        )

    def test_experiments_read_the_names_from_here(self):
        from experiments import elpv_runs
        from experiments import runs

        self.assertEqual(runs.METRICS_FILE, model_dir.METRICS_FILE)
        self.assertEqual(runs.CONFIG_FILE, model_dir.CONFIG_FILE)
        self.assertEqual(
            os.path.basename(elpv_runs.pretrained_weights("out")), model_dir.BACKBONE_WEIGHTS_FILE
        )


class LoadingTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.directory = _temporary_directory(self)

    def test_model_file_of_a_file_and_a_model_dir(self):
        path = os.path.join(self.directory, model_dir.MODEL_FILE)
        with open(path, "w") as f:
            f.write("stand-in")
        self.assertEqual(model_dir.model_file(self.directory), path)
        self.assertEqual(model_dir.model_file(path), path)

    def test_model_file_errors_name_the_path(self):
        with self.assertRaisesRegex(ValueError, r"model_dir containing 'model.keras'.*neither"):
            model_dir.model_file(self.directory)
        other = os.path.join(self.directory, "weights.h5")
        with open(other, "w") as f:
            f.write("stand-in")
        with self.assertRaisesRegex(ValueError, "weights.h5"):
            model_dir.model_file(other)

    def test_read_config(self):
        self.assertEqual(model_dir.read_config(self.directory), {})
        model_dir.write_json(os.path.join(self.directory, model_dir.CONFIG_FILE), {"seed": 3})
        self.assertEqual(model_dir.read_config(self.directory), {"seed": 3})
        beside = os.path.join(self.directory, model_dir.MODEL_FILE)
        self.assertEqual(model_dir.read_config(beside), {"seed": 3})

    def test_load_model_round_trip(self):
        model = cgc_tf.CGCModel(testing_models.tiny_convnet(), target_layer="features")
        images = tf.random.stateless_uniform((2, 16, 16, 3), seed=(1, 2))
        model.save(os.path.join(self.directory, model_dir.MODEL_FILE))
        loaded = model_dir.load_model(self.directory)
        self.assertIsInstance(loaded, cgc_tf.CGCModel)
        self.assertAllClose(loaded.explain(images)["heatmap"], model.explain(images)["heatmap"])


if __name__ == "__main__":
    tf.test.main()
