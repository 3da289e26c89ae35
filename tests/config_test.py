"""Tests of cgc_tf.config: validation messages, JSON round trip, defaults."""

import dataclasses
import os
import stat

from absl.testing import parameterized
import tensorflow as tf

from cgc_tf import backbones
from cgc_tf import config as config_lib
from cgc_tf import model as model_lib


class TrainConfigTest(tf.test.TestCase, parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.model_dir = os.path.join(self.get_temp_dir(), "run")

    def config(self, **changes):
        return config_lib.TrainConfig(model_dir=self.model_dir, **changes)

    def assert_invalid(self, config, *fragments):
        with self.assertRaises(ValueError) as raised:
            config.validate()
        message = str(raised.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_defaults_are_valid_and_create_model_dir(self):
        config = self.config()
        self.assertIs(config.validate(), config)
        self.assertTrue(os.path.isdir(self.model_dir))
        self.assertEqual(os.listdir(self.model_dir), [])  # the probe file is removed

    def test_default_model_dir_is_relative_run_folder(self):
        self.assertEqual(
            config_lib.TrainConfig().model_dir, os.path.join("cgc_runs", "cluttered_digits")
        )

    def test_archs_mirror_backbones(self):
        self.assertEqual(sorted(config_lib.ARCHS), sorted(backbones.BUILDERS))
        self.assertEqual(sorted(config_lib.MIN_IMAGE_SIZE), sorted(backbones.BUILDERS))

    def test_views_mirror_the_model(self):
        self.assertEqual(config_lib.VIEWS, model_lib.VIEWS)

    def test_arch_accepts_keras_applications_and_module_callable(self):
        for arch in ("MobileNetV2", "my_package.models:build"):
            self.assertEqual(self.config(arch=arch).validate().arch, arch)

    @parameterized.named_parameters(
        ("temperature_zero", {"temperature": 0.0}, "temperature=0.0 must be > 0"),
        ("temperature_negative", {"temperature": -1.0}, "temperature=-1.0 must be > 0"),
        ("lambda_negative", {"lambda_": -0.5}, "lambda_=-0.5 must be >= 0"),
        ("arch", {"arch": "vgg16"}, "arch='vgg16' is not one of"),
        ("schedule", {"lr_schedule": "poly"}, "lr_schedule='poly' is not one of"),
        ("strategy", {"strategy": "horovod"}, "strategy='horovod' is not one of"),
        ("consistency", {"consistency": "kl"}, "consistency='kl' is not one of"),
        ("mixed_precision", {"mixed_precision": "fp16"}, "mixed_precision='fp16' is not one of"),
        ("jit_compile", {"jit_compile": "yes"}, "jit_compile='yes' is not one of"),
        (
            "weight_decay_mode",
            {"weight_decay_mode": "adamw"},
            "weight_decay_mode='adamw' is not one of",
        ),
        ("views", {"views": 4}, "views=4 is not one of [2, 3]"),
        ("transform_area", {"transform_min_area": 0.0}, "transform_min_area=0.0 must be in (0, 1]"),
        ("examples_per_class", {"examples_per_class": 0}, "examples_per_class=0 must be"),
        ("epochs", {"epochs": 0}, "epochs=0 must be an integer >= 1"),
        ("learning_rate", {"learning_rate": 0.0}, "learning_rate=0.0 must be > 0"),
        ("momentum", {"momentum": 1.0}, "momentum=1.0 must be in [0, 1)"),
        ("weight_decay", {"weight_decay": -1e-4}, "weight_decay=-0.0001 must be >= 0"),
        ("decay_factor", {"lr_decay_factor": 2.0}, "lr_decay_factor=2.0 must be in (0, 1]"),
        ("steps", {"steps_per_epoch": 0}, "steps_per_epoch=0 must be an integer >= 1"),
        ("eval_every", {"eval_every": 0}, "eval_every=0 must be an integer >= 1"),
        ("image_size_resnet", {"arch": "resnet50", "image_size": 16}, "image_size=16 must be"),
        ("tpu_without_tpu_strategy", {"tpu": "grpc://x"}, "tpu='grpc://x' is only used"),
        ("unlabeled_split_alone", {"unlabeled_split": "train"}, "needs unlabeled="),
        ("milestones_order", {"lr_decay_milestones": [16, 12]}, "increasing epochs >= 1"),
        ("milestones_empty", {"lr_decay_milestones": []}, "increasing epochs >= 1"),
        (
            "milestones_without_step",
            {"lr_decay_milestones": [12], "lr_schedule": "cosine"},
            "only used with lr_schedule='step'",
        ),
        (
            "plain_with_unlabeled",
            {"consistency": "none", "unlabeled": "cluttered_digits"},
            "consistency='none' (the plain baseline) trains on labelled images only",
        ),
        ("bool_flag", {"resume": "yes"}, "resume='yes' must be True or False"),
    )
    def test_invalid_value_is_named(self, changes, fragment):
        self.assert_invalid(self.config(**changes), "Invalid training configuration", fragment)

    def test_contrastive_needs_two_images_per_batch(self):
        self.assert_invalid(
            self.config(batch_size=1), "batch_size=1 is too small for consistency='contrastive'"
        )
        self.config(batch_size=1, consistency="mse").validate()

    def test_several_errors_reported_together(self):
        message = self.assert_invalid(
            self.config(temperature=0.0, lambda_=-1.0, arch="vgg", batch_size=1),
            "temperature=0.0",
            "lambda_=-1.0",
            "arch='vgg'",
            "batch_size=1",
        )
        self.assertLen([line for line in message.splitlines() if line.startswith("  - ")], 4)

    def test_tfds_name_needs_data_dir(self):
        self.assert_invalid(
            self.config(dataset="caltech_birds2011"),
            "dataset='caltech_birds2011' is a tensorflow-datasets name and needs data_dir",
        )
        missing = os.path.join(self.get_temp_dir(), "missing")
        self.assert_invalid(
            self.config(dataset="caltech_birds2011", data_dir=missing),
            f"data_dir={missing!r} does not exist",
        )
        self.config(dataset="caltech_birds2011", data_dir=self.get_temp_dir()).validate()

    def test_unlabeled_tfds_name_needs_data_dir(self):
        self.assert_invalid(self.config(unlabeled="imagenet2012"), "unlabeled='imagenet2012'")

    def test_embedded_holdout_dataset_needs_no_data_dir(self):
        config = self.config(dataset="cluttered_digits_holdout", unlabeled="cluttered_digits_holdout")
        self.assertIs(config.validate(), config)
        self.assertTrue(config.uses_embedded_dataset)

    def test_folder_dataset_must_exist(self):
        missing = os.path.join(self.get_temp_dir(), "no_such_folder")
        self.assert_invalid(
            self.config(dataset=f"folder:{missing}"), f"image folder {missing!r} does not exist"
        )
        self.config(dataset=f"folder:{self.get_temp_dir()}").validate()

    def test_init_weights_must_be_existing_weights_file(self):
        self.assert_invalid(self.config(init_weights="model.keras"), "'.weights.h5'")
        missing = os.path.join(self.get_temp_dir(), "missing.weights.h5")
        self.assert_invalid(self.config(init_weights=missing), f"{missing!r} does not exist")

    def test_unwritable_model_dir(self):
        if os.geteuid() == 0:
            # root ignores permission bits; a path under a regular file cannot be created.
            blocker = os.path.join(self.get_temp_dir(), "a_file")
            with open(blocker, "w") as f:
                f.write("x")
            model_dir = os.path.join(blocker, "run")
        else:
            parent = os.path.join(self.get_temp_dir(), "read_only")
            os.makedirs(parent)
            os.chmod(parent, stat.S_IRUSR | stat.S_IXUSR)
            model_dir = os.path.join(parent, "run")
        config = config_lib.TrainConfig(model_dir=model_dir)
        self.assert_invalid(config, f"model_dir={model_dir!r} is not writable")

    def test_json_round_trip(self):
        config = self.config(
            dataset="cluttered_digits",
            examples_per_class=10,
            unlabeled="cluttered_digits",
            unlabeled_split="train",
            lambda_=0.25,
            steps_per_epoch=3,
            jit_compile="false",
        )
        restored = config_lib.TrainConfig.from_json(config.to_json())
        self.assertEqual(restored, config)
        self.assertEqual(restored.to_json(), config.to_json())

    def test_from_json_fills_defaults_and_rejects_unknown_fields(self):
        self.assertEqual(
            config_lib.TrainConfig.from_json('{"epochs": 3}'), config_lib.TrainConfig(epochs=3)
        )
        with self.assertRaisesRegex(ValueError, r"unknown fields \['epoch'\]"):
            config_lib.TrainConfig.from_json('{"epoch": 3}')
        with self.assertRaisesRegex(ValueError, "must be an object"):
            config_lib.TrainConfig.from_json("[1, 2]")

    def test_frozen_and_replace(self):
        config = self.config()
        with self.assertRaises(dataclasses.FrozenInstanceError):
            config.epochs = 3
        self.assertEqual(config.replace(epochs=3).epochs, 3)
        self.assertEqual(config.epochs, config_lib.TrainConfig().epochs)


if __name__ == "__main__":
    tf.test.main()
