"""cgc_tf.training_checks: the refusals before a run trains, and where it resumes from."""

import json
import os
import shutil
import tempfile
import types

import tensorflow as tf

from cgc_tf import config as config_lib
from cgc_tf import model_dir as layout
from cgc_tf import training_checks


def _strategy(replicas):
    return types.SimpleNamespace(num_replicas_in_sync=replicas)


class TrainingChecksTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.model_dir = tempfile.mkdtemp(prefix="cgc_training_checks_test_")
        self.addCleanup(shutil.rmtree, self.model_dir, ignore_errors=True)
        self.config = config_lib.TrainConfig(model_dir=self.model_dir, batch_size=8)

    def touch(self, name):
        path = os.path.join(self.model_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("stand-in")
        return path

    def test_check_replicas(self):
        training_checks.check_replicas(self.config, _strategy(4))
        with self.assertRaisesRegex(
            training_checks.ConfigurationError, r"batch_size=8 \(global\) must be divisible.*3"
        ):
            training_checks.check_replicas(self.config, _strategy(3))
        contrastive = self.config.replace(consistency="contrastive")
        with self.assertRaisesRegex(training_checks.ConfigurationError, "needs >= 2 per replica"):
            training_checks.check_replicas(contrastive, _strategy(8))
        with self.assertRaisesRegex(training_checks.ConfigurationError, "jit_compile='true'"):
            training_checks.check_replicas(self.config.replace(jit_compile="true"), _strategy(2))

    def test_completed_epochs_of_an_empty_model_dir(self):
        self.assertEqual(
            training_checks.completed_epochs(self.model_dir, multi_worker=False),
            (os.path.join(self.model_dir, layout.BACKUP_DIR), 0),
        )
        self.assertEqual(
            training_checks.completed_epochs(self.model_dir, multi_worker=True),
            (os.path.join(self.model_dir, layout.MULTI_WORKER_DIR), 0),
        )

    def test_reset_model_dir_removes_checkpoints_and_log_only(self):
        self.touch(os.path.join(layout.BACKUP_DIR, "latest.weights.h5"))
        self.touch(layout.LOG_FILE)
        self.touch(layout.CONFIG_FILE)
        training_checks.reset_model_dir(self.model_dir)
        self.assertEqual(os.listdir(self.model_dir), [layout.CONFIG_FILE])

    def test_fit_checkpoint_is_refused_by_multi_worker(self):
        self.touch(os.path.join(layout.BACKUP_DIR, "latest.weights.h5"))
        with self.assertRaisesRegex(training_checks.ConfigurationError, "Keras fit run"):
            training_checks.check_resumable(self.config, multi_worker=True, say=print)

    def test_changed_settings_are_reported_and_other_variables_refused(self):
        self.touch(os.path.join(layout.BACKUP_DIR, "latest.weights.h5"))
        previous = dict(json.loads(self.config.to_json()), learning_rate=1.0, epochs=1)
        layout.write_json(os.path.join(self.model_dir, layout.CONFIG_FILE), previous)
        messages = []
        training_checks.check_resumable(self.config, multi_worker=False, say=messages.append)
        # epochs may change on resume without a word; learning_rate is reported.
        self.assertEqual(messages, ["Resuming with changed settings: ['learning_rate']"])
        layout.write_json(
            os.path.join(self.model_dir, layout.CONFIG_FILE), dict(previous, image_size=64)
        )
        with self.assertRaisesRegex(
            training_checks.ConfigurationError,
            rf"different model \(image_size: 64 -> {self.config.image_size}\)",
        ):
            training_checks.check_resumable(self.config, multi_worker=False, say=messages.append)

    def test_no_checkpoint_no_check(self):
        layout.write_json(
            os.path.join(self.model_dir, layout.CONFIG_FILE),
            dict(json.loads(self.config.to_json()), image_size=64),
        )
        messages = []
        training_checks.check_resumable(self.config, multi_worker=False, say=messages.append)
        self.assertEqual(messages, [])


if __name__ == "__main__":
    tf.test.main()
