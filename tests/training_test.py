"""Tests of cgc_tf.training: model_dir layout, resume, NaN stop, schedules, model checks."""

import csv
import glob
import json
import os
import tempfile

from absl.testing import parameterized
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.util import event_pb2

from cgc_tf import backbones
from cgc_tf import callbacks
from cgc_tf import config as config_lib
from cgc_tf import data
from cgc_tf import model_dir as layout
from cgc_tf import training
from cgc_tf import training_input

IMAGE_SIZE = 32


def _read_log(model_dir):
    with open(os.path.join(model_dir, layout.LOG_FILE), newline="") as f:
        return list(csv.DictReader(f))


def _summary_tags(directory):
    tags = set()
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            tags.update(
                (value.tag, value.metadata.plugin_data.plugin_name) for value in event.summary.value
            )
    return tags


class _InjectNaN(keras.callbacks.Callback):
    """Sets the classifier kernel to NaN before the first step of epoch `epoch`."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch
        self._current = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self._current == self.epoch and batch == 0:
            kernel = self.model.backbone.get_layer("predictions").kernel
            kernel.assign(tf.fill(kernel.shape, float("nan")))


@pytest.mark.slow
class RunTrainingTest(tf.test.TestCase):
    """Tiny real runs: 32x32 cluttered digits, batch 8, 2 steps per epoch."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.data_dir = tempfile.mkdtemp(prefix="cgc_training_test_tfds_")
        data.dataset_info("cluttered_digits", data_dir=cls.data_dir, image_size=IMAGE_SIZE)

    def config(self, model_dir, **changes):
        values = dict(
            data_dir=self.data_dir,
            image_size=IMAGE_SIZE,
            batch_size=8,
            steps_per_epoch=2,
            epochs=1,
            warmup_epochs=0,
            learning_rate=0.01,
            model_dir=model_dir,
            export=False,
            # float32 whatever the CPU: the tests below compare saved models
            # exactly (mixed_precision_test.py trains with "auto" / bfloat16).
            mixed_precision="none",
        )
        values.update(changes)
        return config_lib.TrainConfig(**values)

    def test_layout_resume_and_finished_rerun(self):
        model_dir = os.path.join(self.get_temp_dir(), "run")
        first = training.run_training(self.config(model_dir, epochs=1), progress=False)

        for name in (
            "config.json",
            "model.keras",
            "metrics.json",
            "log.csv",
            "checkpoints/backup/latest.weights.h5",
            "checkpoints/backup/training_metadata.json",
            "checkpoints/last_epoch.keras",
        ):
            self.assertTrue(os.path.isfile(os.path.join(model_dir, name)), name)
        with open(os.path.join(model_dir, "metrics.json")) as f:
            metrics = json.load(f)
        self.assertEqual(metrics, first)
        self.assertEqual(metrics["eval_split"], "test")
        self.assertBetween(metrics["accuracy"], 0.0, 1.0)
        self.assertEqual(metrics["epochs_run_this_time"], 1)
        self.assertEqual(metrics["protocol"], "cgc_tf")
        self.assertBetween(
            metrics["explanations"]["consistency_cosine_training_transforms"], -1.0, 1.0
        )
        with open(os.path.join(model_dir, "config.json")) as f:
            self.assertEqual(
                config_lib.TrainConfig.from_json(f.read()), self.config(model_dir, epochs=1)
            )
        tensorboard = os.path.join(model_dir, "tensorboard")
        self.assertIn(("epoch_loss", "scalars"), _summary_tags(os.path.join(tensorboard, "train")))
        self.assertIn(("epoch_cgc_loss", "scalars"), _summary_tags(os.path.join(tensorboard, "train")))
        self.assertIn(
            ("epoch_accuracy", "scalars"), _summary_tags(os.path.join(tensorboard, "validation"))
        )
        self.assertIn(("heatmaps", "images"), _summary_tags(os.path.join(tensorboard, "heatmaps")))

        loaded = keras.models.load_model(os.path.join(model_dir, "model.keras"))
        images = np.random.default_rng(0).random((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
        explanation = loaded.explain(images)
        self.assertEqual(explanation["heatmap"].shape, (2, IMAGE_SIZE, IMAGE_SIZE))
        last_epoch = keras.models.load_model(os.path.join(model_dir, "checkpoints/last_epoch.keras"))
        self.assertAllClose(last_epoch.predict(images, verbose=0), loaded.predict(images, verbose=0))

        # Resume: only the second epoch runs; the log continues.
        second = training.run_training(self.config(model_dir, epochs=2), progress=False)
        self.assertEqual(second["epochs_run_this_time"], 1)
        rows = _read_log(model_dir)
        self.assertEqual([row["epoch"] for row in rows], ["0", "1"])
        self.assertIn("val_accuracy", rows[0])
        self.assertIn("learning_rate", rows[0])

        # A finished run re-run trains nothing and keeps the log.
        third = training.run_training(self.config(model_dir, epochs=2), progress=False)
        self.assertEqual(third["epochs_run_this_time"], 0)
        self.assertAllClose(third["accuracy"], second["accuracy"])
        self.assertEqual([row["epoch"] for row in _read_log(model_dir)], ["0", "1"])

    def test_resumed_limited_run_keeps_its_labelled_subset(self):
        model_dir = os.path.join(self.get_temp_dir(), "limited")
        # The plain baseline: the fastest step, and its run end to end.
        config = self.config(model_dir, examples_per_class=2, batch_size=4, consistency="none")
        first = training.run_training(config, progress=False)
        self.assertNotIn("cgc_loss", first)
        # Explanations of the plain model: Grad-CAM of the trained network.
        self.assertBetween(first["explanations"]["content_heatmap_percent"], 0.0, 100.0)
        path = os.path.join(model_dir, layout.LABELLED_SUBSET_FILE)
        with open(path, "rb") as f:
            written = f.read()
        subset = data.labelled_subset("cluttered_digits", 2, 0, IMAGE_SIZE, data_dir=self.data_dir)
        self.assertEqual(json.loads(written), {
            "dataset": "cluttered_digits", "split": "train", "seed": 0,
            "examples_per_class": 2, "examples": subset["examples"],
        })

        second = training.run_training(config.replace(epochs=2), progress=False)
        self.assertEqual(second["epochs_run_this_time"], 1)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), written)

        def one_pass(completed_epochs):
            (features, _), = list(training_input.train_dataset(config, 20, completed_epochs, None))
            return features["image"].numpy().sum(axis=(1, 2, 3))

        # The resumed run's pipeline (seed shifted by the completed epoch) reads the
        # same 20 examples as the first epoch's, in another order.
        before, after = one_pass(0), one_pass(1)
        self.assertAllEqual(np.sort(before), np.sort(after))
        self.assertNotAllEqual(before, after)

        # Data that changed since the run started: refused, the file left as it is.
        changed = json.loads(written)
        changed["examples"]["0"] = ["train_0.tfrecord-00000-of-00001__0", "an-unknown-example"]
        with open(path, "w") as f:
            json.dump(changed, f)
        with self.assertRaisesRegex(
            training.ConfigurationError, r"another labelled subset.*examples differ.*\['0'\]"
        ):
            training.run_training(config.replace(epochs=3), progress=False)
        with open(path) as f:
            self.assertEqual(json.load(f), changed)

    def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(self):
        model_dir = os.path.join(self.get_temp_dir(), "nan")
        config = self.config(model_dir, epochs=2, learning_rate=0.05)
        with self.assertRaises(callbacks.NonFiniteLossError) as raised:
            training.run_training(config, progress=False, callbacks=[_InjectNaN(epoch=1)])
        message = str(raised.exception)
        for fragment in ("epoch 2, step 1", "loss=nan", "ce_loss=nan", "cgc_loss=",
                         "learning rate too high", "learning_rate=0.05", "checkpoints"):
            self.assertIn(fragment, message)

        self.assertFalse(os.path.exists(os.path.join(model_dir, "model.keras")))
        self.assertEqual([row["epoch"] for row in _read_log(model_dir)], ["0"])
        self.assertEqual(
            callbacks.PreemptibleBackupAndRestore.completed_epochs(
                os.path.join(model_dir, layout.BACKUP_DIR)
            ),
            1,
        )
        good = keras.models.load_model(os.path.join(model_dir, "checkpoints/last_epoch.keras"))
        for weight in good.get_weights():
            self.assertTrue(np.all(np.isfinite(weight)))
        # The BackupAndRestore weights were not overwritten with the NaN state either.
        good.compile(optimizer=keras.optimizers.SGD(momentum=0.9), jit_compile=False)
        good.optimizer.build(good.trainable_variables)
        good.load_weights(os.path.join(model_dir, "checkpoints/backup/latest.weights.h5"))
        for weight in good.get_weights():
            self.assertTrue(np.all(np.isfinite(weight)))


class ScheduleTest(tf.test.TestCase, parameterized.TestCase):

    def schedule(self, **changes):
        config = config_lib.TrainConfig(**changes)
        return training.learning_rate_schedule(config, steps_per_epoch=10)

    def rates(self, schedule, steps):
        if callable(schedule):
            return [float(schedule(step)) for step in steps]
        return [float(schedule)] * len(steps)

    def test_step_decay(self):
        schedule = self.schedule(
            lr_schedule="step", learning_rate=0.1, epochs=90, lr_decay_epochs=30,
            lr_decay_factor=0.1, warmup_epochs=0,
        )
        self.assertAllClose(
            self.rates(schedule, [0, 299, 300, 599, 600, 899]),
            [0.1, 0.1, 0.01, 0.01, 0.001, 0.001],
        )

    def test_step_decay_at_milestones(self):
        """torch's MultiStepLR(milestones=[12, 16], gamma=0.2), 10 steps per epoch."""
        schedule = self.schedule(
            lr_schedule="step", learning_rate=0.02, epochs=50, lr_decay_milestones=[12, 16],
            lr_decay_factor=0.2, warmup_epochs=0,
        )
        self.assertAllClose(
            self.rates(schedule, [0, 119, 120, 159, 160, 240, 499]),
            [0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008, 0.0008],
        )

    def test_step_without_decay_in_range_is_constant(self):
        schedule = self.schedule(
            lr_schedule="step", learning_rate=0.1, epochs=10, lr_decay_epochs=30, warmup_epochs=0
        )
        self.assertEqual(schedule, 0.1)

    def test_cosine_with_warmup(self):
        schedule = self.schedule(lr_schedule="cosine", learning_rate=0.2, epochs=4, warmup_epochs=1)
        rates = self.rates(schedule, [0, 4, 9, 20, 39, 40])
        cosine = lambda step: 0.1 * (1 + np.cos(np.pi * step / 40))  # noqa: E731
        self.assertAllClose(
            rates, [cosine(0) * 0.1, cosine(4) * 0.5, cosine(9), cosine(20), cosine(39), 0.0]
        )

    def test_constant_with_warmup_and_serialization(self):
        schedule = self.schedule(lr_schedule="constant", learning_rate=0.3, warmup_epochs=2)
        self.assertAllClose(self.rates(schedule, [0, 9, 19, 100]), [0.015, 0.15, 0.3, 0.3])
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(schedule)
        )
        self.assertAllClose(self.rates(restored, [0, 19]), [0.015, 0.3])

    def test_step_with_warmup_serialization(self):
        schedule = self.schedule(
            lr_schedule="step", epochs=6, lr_decay_epochs=2, warmup_epochs=1, learning_rate=0.1
        )
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(schedule)
        )
        self.assertAllClose(self.rates(restored, [0, 10, 20, 40]), [0.01, 0.1, 0.01, 0.001])


class ModelChecksTest(tf.test.TestCase):

    def test_target_layer_not_found_lists_candidates(self):
        backbone, _ = backbones.build("small_resnet", (IMAGE_SIZE, IMAGE_SIZE, 3), 10)
        with self.assertRaisesRegex(training.ConfigurationError, "not a layer of") as raised:
            training.check_target_layer(backbone, "conv9_block1_out")
        self.assertIn("conv4_block1_out", str(raised.exception))

    def test_target_layer_not_4d(self):
        backbone, _ = backbones.build("small_resnet", (IMAGE_SIZE, IMAGE_SIZE, 3), 10)
        with self.assertRaisesRegex(training.ConfigurationError, r"avg_pool.*not 4-D"):
            training.check_target_layer(backbone, "avg_pool")

    def test_init_weights_head_mismatch_reported_and_wrong_file_rejected(self):
        directory = self.get_temp_dir()
        source, _ = backbones.build("small_resnet", (IMAGE_SIZE, IMAGE_SIZE, 3), 10)
        # Trained weights differ from any initialisation.
        source.set_weights([w + 0.5 for w in source.get_weights()])
        weights = os.path.join(directory, "digits.weights.h5")
        source.save_weights(weights)
        config = config_lib.TrainConfig(
            init_weights=weights, image_size=IMAGE_SIZE, model_dir=directory
        )
        messages = []
        backbone, target_layer = training.build_backbone(config, 5, say=messages.append)
        self.assertEqual(target_layer, "conv4_block1_out")
        self.assertLen(messages, 1)
        self.assertIn("['predictions']", messages[0])
        self.assertAllClose(
            backbone.get_layer("conv1_conv").get_weights()[0],
            source.get_layer("conv1_conv").get_weights()[0],
        )

        other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        wrong = os.path.join(directory, "other.weights.h5")
        other.save_weights(wrong)
        with self.assertRaisesRegex(training.ConfigurationError, "matched no layer"):
            training.build_backbone(config.replace(init_weights=wrong), 10, say=messages.append)

    def test_keras_applications_arch_gets_the_automatic_target_layer(self):
        config = config_lib.TrainConfig(
            arch="MobileNetV3Small", image_size=32, model_dir=self.get_temp_dir()
        )
        backbone, target_layer = training.build_backbone(config, 3)
        self.assertEqual(backbone.output.shape[-1], 3)
        # At 32x32 the last map (and the 1x1 logits convolution) is 1x1: not a target.
        shape = backbone.get_layer(target_layer).output.shape
        self.assertGreater(shape[1] * shape[2], 1)

    def test_refuses_to_resume_a_different_model(self):
        model_dir = self.get_temp_dir()
        previous = config_lib.TrainConfig(arch="resnet18", model_dir=model_dir)
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            f.write(previous.to_json())
        os.makedirs(os.path.join(model_dir, layout.BACKUP_DIR))
        with open(os.path.join(model_dir, layout.BACKUP_DIR, "latest.weights.h5"), "w") as f:
            f.write("a checkpoint of the resnet18 run")
        with self.assertRaisesRegex(
            training.ConfigurationError, r"different model \(arch: 'resnet18' -> 'small_resnet'\)"
        ):
            training.run_training(previous.replace(arch="small_resnet"), progress=False)


if __name__ == "__main__":
    tf.test.main()
