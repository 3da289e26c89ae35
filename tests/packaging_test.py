"""The installed package: every console script's entry point imports, --help lists its flags."""

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from importlib import metadata

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _console_scripts():
    try:
        distribution = metadata.distribution("cgc-tf")
    except metadata.PackageNotFoundError:
        return []
    return [ep for ep in distribution.entry_points if ep.group == "console_scripts"]


@pytest.mark.skipif(not _console_scripts(), reason="cgc-tf is not pip-installed")
def test_console_scripts_load():
    scripts = {ep.name: ep for ep in _console_scripts()}
    assert set(scripts) == {"cgc-train", "cgc-evaluate", "cgc-export", "cgc-prepare"}
    for name, entry_point in scripts.items():
        # Found, not imported: the three binaries define some of the same absl
        # flags. A legacy `setup.py develop` install fails here: it does not map
        # cgc_tf_train -> train/ (pyproject.toml makes pip use PEP 660).
        module, _, function = entry_point.value.partition(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, name
        with open(spec.origin) as source:
            assert f"def {function}(" in source.read(), name


# Flags (with a word of their help text) each binary's --help must list.
_OWN_FLAGS = {
    "cgc-train": {"--model_dir": "Output directory", "--epochs": "Total epochs",
                  "--lambda_": "Consistency loss weight", "--dataset": "cluttered_digits"},
    "cgc-export": {"--model_dir": "cgc-train --model_dir", "--export_dir": "Destination",
                   "--opset": "ONNX opset"},
    "cgc-evaluate": {"--model_dir": "cgc-train --model_dir", "--compare": "second model",
                     "--max_images": "at most"},
    "cgc-prepare": {"--folder": "Image folder root", "--name": "Dataset name",
                    "--shard_mib": "record file size"},
}


@functools.lru_cache(maxsize=None)
def _help(*command):
    """The --help output of `command` (cached: each run imports TensorFlow)."""
    result = subprocess.run(
        [*command, "--help"], capture_output=True, text=True, check=False, timeout=600, cwd=REPO
    )
    return result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not _console_scripts(), reason="cgc-tf is not pip-installed")
def test_help_lists_each_binarys_own_flags():
    for name, expected in _OWN_FLAGS.items():
        text = _help(shutil.which(name))
        assert "Try --helpfull" in text, text[-2000:]
        for flag, help_words in expected.items():
            lines = [line for line in text.splitlines() if line.strip().startswith(flag + ":")]
            assert lines, f"{name} --help does not list {flag}:\n{text[-3000:]}"
            # The help text follows the flag name (wrapped, so read on from it).
            assert help_words in text[text.index(lines[0]):][:400], (name, flag)
        # absl's own flags stay behind --helpfull.
        assert "--logtostderr" not in text, name
    # Run as a module, __main__ is the binary itself: its flags are listed too.
    text = _help(sys.executable, "-m", "train.main")
    assert "  --epochs: Total epochs" in text, text[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not _console_scripts(), reason="cgc-tf is not pip-installed")
def test_evaluate_help_lists_the_flags_shared_with_train_once():
    # Defined from TrainConfig's fields (train/config_flags.py), as cgc-train's.
    text = _help(shutil.which("cgc-evaluate"))
    for flag in ("--dataset", "--data_dir", "--image_size", "--batch_size", "--seed",
                 "--transform_min_area"):
        lines = [line for line in text.splitlines() if line.strip().startswith(flag + ":")]
        assert len(lines) == 1, (flag, text[-3000:])
    assert "Input side in pixels" in text, text[-3000:]  # image_size's TrainConfig help
