"""Tests of train/config_flags.py: one absl flag per TrainConfig field, from the field."""

import dataclasses
import os
import subprocess
import sys
import typing

import pytest
import tensorflow as tf
from absl import flags
from absl.testing import parameterized

from cgc_tf import config as config_lib
from tests import testing_processes
from train import config_flags

CONFIGS = os.path.join(testing_processes.REPO, "train", "configs")
FIELDS = {field.name: field for field in dataclasses.fields(config_lib.TrainConfig)}
# The flags cgc-evaluate shares with cgc-train.
EVALUATE_SHARED = ("dataset", "data_dir", "image_size", "batch_size", "seed", "transform_min_area")


def _defined(names=None, **options):
    """(FlagValues, holders) with `define_config_flags` run on a fresh FlagValues."""
    flag_values = flags.FlagValues()
    holders = config_flags.define_config_flags(names, flag_values=flag_values, **options)
    return flag_values, holders


def _parse(*arguments, **options):
    """The TrainConfig of command-line `arguments`."""
    flag_values, holders = _defined(**options)
    flag_values(["cgc-train", *arguments])
    return config_flags.config_from_flags(holders)


def _convert(field, text):
    """A flagfile value as the field's type, by hand (the oracle of the flag parsers)."""
    value_type = field.type
    if typing.get_origin(value_type) is typing.Union:
        (value_type,) = [arg for arg in typing.get_args(value_type) if arg is not type(None)]
    if value_type is bool:
        return {"true": True, "false": False}[text.lower()]
    if value_type in (int, float, str):
        return value_type(text)
    assert value_type == list[int], field
    return int(text)


def _read_flagfile(path):
    """TrainConfig of a flagfile read line by line: --name=value, --name, --noname."""
    values = {}
    with open(path) as file:
        for line in file:
            line = line.strip()
            if not line.startswith("--"):
                continue
            name, has_value, text = line[2:].partition("=")
            if not has_value:  # a boolean: --name or --noname
                name, text = (name, "true") if name in FIELDS else (name[2:], "false")
            name = "lambda_" if name == "lambda" else name
            value = _convert(FIELDS[name], text)
            if FIELDS[name].type == typing.Optional[list[int]]:
                value = values.get(name, []) + [value]
            values[name] = value
    return config_lib.TrainConfig(**values)


def _flagfiles():
    return sorted(name for name in os.listdir(CONFIGS) if name.endswith(".cfg"))


class ConfigFlagsTest(tf.test.TestCase, parameterized.TestCase):
    def test_every_field_has_exactly_one_flag_with_help(self):
        flag_values, holders = _defined()
        self.assertEqual(list(holders), list(FIELDS))
        # Every flag but the aliases is a field's flag, named as the field.
        aliases = {
            alias for field in FIELDS.values() for alias in field.metadata.get("aliases", ())
        }
        self.assertEqual(aliases, {"lambda"})
        self.assertEqual(set(flag_values) - aliases, set(FIELDS))
        for name, field in FIELDS.items():
            self.assertEqual(holders[name].name, name)
            self.assertTrue(field.metadata.get("help", "").strip(), f"{name} has no help text")
            # absl adds an enum's values before the text, "repeat this option" after a list's.
            self.assertIn(field.metadata["help"], flag_values[name].help)
            self.assertEqual(holders[name].default, field.default, name)

    def test_no_flags_give_the_default_config(self):
        self.assertEqual(_parse(), config_lib.TrainConfig())

    def test_flag_types(self):
        config = _parse(
            "--epochs=3", "--learning_rate=0.25", "--lambda=0.1", "--noexport",
            "--synchronized_batch_norm", "--lr_schedule=step", "--lr_decay_milestones=5",
            "--lr_decay_milestones=8", "--examples_per_class=4", "--data_dir=/d", "--views=3",
        )
        self.assertEqual(
            (config.epochs, config.learning_rate, config.lambda_, config.export,
             config.synchronized_batch_norm, config.lr_schedule, config.lr_decay_milestones,
             config.examples_per_class, config.data_dir, config.views),
            (3, 0.25, 0.1, False, True, "step", [5, 8], 4, "/d", 3),
        )
        self.assertIsInstance(config.learning_rate, float)
        self.assertIsInstance(_parse("--learning_rate=1").learning_rate, float)

    @parameterized.parameters(
        ("strategy", config_lib.STRATEGIES),
        ("consistency", config_lib.CONSISTENCIES),
        ("lr_schedule", config_lib.LR_SCHEDULES),
        ("mixed_precision", config_lib.MIXED_PRECISIONS),
        ("jit_compile", config_lib.JIT_COMPILES),
        ("weight_decay_mode", config_lib.WEIGHT_DECAY_MODES),
    )
    def test_enum_flags_name_the_allowed_values(self, name, allowed):
        flag_values, _ = _defined()
        with self.assertRaises(flags.IllegalFlagValueError) as raised:
            flag_values(["cgc-train", f"--{name}=bogus"])
        self.assertIn("|".join(allowed), str(raised.exception))

    def test_bad_values_fail_to_parse(self):
        for argument in ("--epochs=1.5", "--learning_rate=fast", "--lr_decay_milestones=x"):
            flag_values, _ = _defined()
            with self.assertRaises(flags.IllegalFlagValueError, msg=argument):
                flag_values(["cgc-train", argument])

    def test_subset_with_other_defaults_and_notes(self):
        flag_values, holders = _defined(
            ["dataset", "batch_size", "lambda_"], defaults={"dataset": None},
            notes={"batch_size": "Here: evaluation."},
        )
        self.assertEqual(list(holders), ["dataset", "batch_size", "lambda_"])
        self.assertEqual(set(flag_values), {"dataset", "batch_size", "lambda_", "lambda"})
        flag_values(["cgc-evaluate"])
        self.assertIsNone(holders["dataset"].value)
        self.assertEqual(holders["batch_size"].value, config_lib.TrainConfig().batch_size)
        self.assertEqual(
            flag_values["batch_size"].help,
            FIELDS["batch_size"].metadata["help"] + " Here: evaluation.",
        )

    def test_unknown_names_raise(self):
        for options in ({"names": ["dataset", "epoch"]}, {"defaults": {"epoch": 1}},
                        {"notes": {"epoch": "x"}}):
            with self.assertRaisesRegex(ValueError, r"\['epoch'\] are not TrainConfig fields"):
                config_flags.define_config_flags(flag_values=flags.FlagValues(), **options)

    @parameterized.parameters(*_flagfiles())
    def test_flagfile_gives_the_config_its_lines_say(self, name):
        path = os.path.join(CONFIGS, name)
        self.assertEqual(_parse(f"--flagfile={path}"), _read_flagfile(path))

    def test_the_main_job_flagfile_is_the_default_config(self):
        self.assertEqual(
            _parse(f"--flagfile={os.path.join(CONFIGS, 'cluttered_digits.cfg')}"),
            config_lib.TrainConfig(),
        )


@pytest.mark.slow
class EvaluateHelpTest(tf.test.TestCase):
    def test_evaluate_help_lists_the_shared_flags_once(self):
        result = subprocess.run(
            [sys.executable, "-m", "evaluate.main", "--help"],
            cwd=testing_processes.REPO,
            env=testing_processes.subprocess_environment(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        lines = (result.stdout + result.stderr).splitlines()
        for name in EVALUATE_SHARED:
            listed = [line for line in lines if line.startswith(f"  --{name}:")]
            self.assertLen(listed, 1, name)
            # TrainConfig's help text, first words (absl wraps the rest).
            help_text = FIELDS[name].metadata["help"]
            self.assertStartsWith(listed[0], f"  --{name}: {help_text[:20]}")


if __name__ == "__main__":
    tf.test.main()
