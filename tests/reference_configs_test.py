"""train/configs/ flagfiles of the reference scripts: what they claim to copy, they copy.

Each reference flagfile names its script (`# reference: <script>`), the settings it
copies (`# copies: ...`) and the ones that must differ (`# differs: <name>: why`).
The expected values are read from ../shared/reference-cgc without importing torch:
the script's argparse defaults (parsed with `ast`), overridden by the reference
README's command line for that script (parsed from the README's code blocks), plus
what the script fixes in code (its torch SGD call, its learning-rate schedule, its
crop sizes and the paired-view crop areas of datasets/imagefolder_cgc_ssl.py).
"""

import ast
import dataclasses
import os
import re
import shlex

import tensorflow as tf

from cgc_tf import config as config_lib
from tests import testing_processes

REFERENCE = os.path.join(os.path.dirname(testing_processes.REPO), "shared", "reference-cgc")
CONFIGS = os.path.join(testing_processes.REPO, "train", "configs")
# One flagfile per reference training script.
REFERENCE_FLAGFILES = {
    "imagenet_resnet50.cfg": "train_eval_cgc.py",
    "imagenet_resnet50_plain.cfg": "baseline_train_eval.py",
    "imagenet_resnet50_gc.cfg": "train_eval_gc_l2_no_contrast_baseline.py",
    "imagenet_1pc_semi.cfg": "train_imagenet_1pc_swav_cgc_unlabeled.py",
}
# Flags that say where data and outputs are, not how to train: every flagfile
# sets them, and they can only differ from a script's paths.
LOCATIONS = ("dataset", "data_dir", "model_dir", "unlabeled", "unlabeled_split")


def _read(name):
    with open(os.path.join(REFERENCE, name)) as f:
        return f.read()


def _calls(tree, name):
    """Every call of a function or method called `name` in `tree`."""
    return [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (getattr(node.func, "attr", None) == name or getattr(node.func, "id", None) == name)
    ]


def argparse_options(tree):
    """{option string: (dest, type name)} and {dest: default} of a script's add_argument calls."""
    options, defaults = {}, {}
    for call in _calls(tree, "add_argument"):
        names = [arg.value for arg in call.args if isinstance(arg, ast.Constant)]
        keywords = {keyword.arg: keyword.value for keyword in call.keywords}
        if "dest" in keywords:
            dest = keywords["dest"].value
        else:
            # argparse: the first long option, else the first option, without dashes.
            long_names = [name for name in names if name.startswith("--")]
            dest = (long_names or names)[0].lstrip("-").replace("-", "_")
        type_name = getattr(keywords.get("type"), "id", "str")
        for name in names:
            options[name] = (dest, type_name)
        if "default" in keywords:
            defaults[dest] = ast.literal_eval(keywords["default"])
        elif getattr(keywords.get("action"), "value", None) == "store_true":
            defaults[dest] = False
    return options, defaults


def readme_overrides(script, options):
    """{dest: value} of the reference README's command line for `script` ({} if none).

    The README's commands are single lines of its code blocks:
    `CUDA_VISIBLE_DEVICES=... python <script> <data> -a resnet50 ... 2>&1 | tee ...`.
    """
    commands = [line for line in _read("README.md").splitlines() if f"python {script} " in line]
    if not commands:
        return {}
    assert len(commands) == 1, commands
    tokens = shlex.split(commands[0])
    tokens = tokens[tokens.index(script) + 1:]
    converters = {"int": int, "float": float, "str": str}
    values = {}
    index = 0
    while index < len(tokens) and tokens[index] not in ("2>&1", "|"):
        token = tokens[index]
        if token.startswith("-"):
            dest, type_name = options[token]
            values[dest] = converters[type_name](tokens[index + 1])
            index += 2
        else:
            index += 1  # The positional data directory.
    return values


def _value(node, settings):
    """A constant, or an `args.<name>` attribute looked up in `settings`."""
    if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "args":
        return settings[node.attr]
    return ast.literal_eval(node)


def _crop_areas(tree):
    """The area ranges of the `RandomResizedCrop.get_params(..., scale=...)` calls."""
    return {
        ast.literal_eval(keyword.value)
        for call in _calls(tree, "get_params")
        for keyword in call.keywords
        if keyword.arg == "scale"
    }


def reference_settings(script):
    """The training settings `script` runs with the README's command, in TrainConfig names."""
    tree = ast.parse(_read(script))
    options, settings = argparse_options(tree)
    settings.update(readme_overrides(script, options))
    (optimizer,) = [
        call for call in _calls(tree, "SGD") if ast.unparse(call.func) == "torch.optim.SGD"
    ]
    optimizer = {keyword.arg: _value(keyword.value, settings) for keyword in optimizer.keywords}
    expected = {
        "arch": settings["arch"],
        "batch_size": settings["batch_size"],
        "epochs": settings["epochs"],
        "learning_rate": settings["lr"],
        # torch.optim.SGD: momentum and L2 weight decay in its own update (coupled).
        "momentum": optimizer["momentum"],
        "weight_decay": optimizer["weight_decay"],
        "weight_decay_mode": "coupled",
        # No warmup anywhere in the script.
        "warmup_epochs": 0 if "warmup" not in _read(script).lower() else None,
    }
    if "lambda_val" in settings:
        expected["lambda_"] = settings["lambda_val"]
        expected["temperature"] = settings["t"]
    if _calls(tree, "adjust_learning_rate"):
        # lr = args.lr * (FACTOR ** (epoch // EPOCHS)) in adjust_learning_rate.
        (function,) = [
            node for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name == "adjust_learning_rate"
        ]
        (power,) = [
            node for node in ast.walk(function)
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow)
        ]
        expected["lr_schedule"] = "step"
        expected["lr_decay_factor"] = ast.literal_eval(power.left)
        expected["lr_decay_epochs"] = ast.literal_eval(power.right.right)
    else:
        (scheduler,) = _calls(tree, "MultiStepLR")
        milestones = _value(scheduler.args[1], settings)
        gamma = {keyword.arg: keyword.value for keyword in scheduler.keywords}["gamma"]
        expected["lr_schedule"] = "step"
        expected["lr_decay_factor"] = _value(gamma, settings)
        # A step schedule decays every P epochs, or at milestones (MultiStepLR).
        period = milestones[0]
        if milestones == list(range(period, settings["epochs"], period)):
            expected["lr_decay_epochs"] = period
        else:
            expected["lr_decay_milestones"] = list(milestones)
    # What the step differentiates: the GC script disables the contrast (MSE), the
    # plain baseline has no consistency criterion at all.
    uses_paired_views = "imagefolder_cgc_ssl" in _read(script)
    if any(k.arg == "disable_contrast" for call in _calls(tree, "model") for k in call.keywords):
        expected["consistency"] = "mse"
    elif "contrastive_criterion" in _read(script):
        expected["consistency"] = "contrastive"
    else:
        expected["consistency"] = "none"
    # Cross-entropy views: the paired-view dataset's xe view (CE on x_xe, x_orig,
    # x_aug), or one RandomResizedCrop view of the labelled images (the plain
    # baseline, the semi-supervised labelled batches): views=3 gives both.
    ce_view_sources = [_read(script)]
    if uses_paired_views:
        ce_view_sources.append(_read(os.path.join("datasets", "imagefolder_cgc_ssl.py")))
        expected["transform_min_area"] = min(
            low for low, _ in _crop_areas(ast.parse(ce_view_sources[-1]))
        )
    sizes = {
        int(size)
        for source in ce_view_sources
        for size in re.findall(r"RandomResizedCrop\((\d+)\)", source)
    }
    (expected["image_size"],) = sizes
    if "xe_images" in _read(script) or re.search(r"RandomResizedCrop\(\d+\)", _read(script)):
        expected["views"] = 3
    return expected


def flagfile(name):
    """(flag values, reference script, copied names, {differing name: reason}).

    A flag value is a string, or the list of strings of a repeated (multi) flag.
    """
    with open(os.path.join(CONFIGS, name)) as f:
        lines = f.read().splitlines()
    values = {}
    for flag, value in (line[2:].split("=", 1) for line in lines if line.startswith("--")):
        values[flag] = values[flag] + [value] if isinstance(values.get(flag), list) else (
            [values[flag], value] if flag in values else value
        )
    script, copies, differs = None, [], {}
    for line in lines:
        if line.startswith("# reference: "):
            script = line[len("# reference: "):].strip()
        elif line.startswith("# copies: "):
            copies += line[len("# copies: "):].split()
        elif line.startswith("# differs: "):
            differing, _, reason = line[len("# differs: "):].partition(": ")
            differs[differing] = reason
    return values, script, copies, differs


def _equal(flag_value, expected):
    if isinstance(expected, list):
        flag_values = flag_value if isinstance(flag_value, list) else [flag_value]
        return len(flag_values) == len(expected) and all(
            _equal(value, item) for value, item in zip(flag_values, expected)
        )
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return abs(float(flag_value) - expected) <= 1e-12 * max(1.0, abs(expected))
    return flag_value == str(expected)


class ReferenceConfigsTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        if not os.path.isdir(REFERENCE):
            self.skipTest(f"the reference code is not at {REFERENCE}")

    def test_argparse_and_readme_parsing(self):
        """Spot checks against values read by eye from the files."""
        tree = ast.parse(_read("train_eval_cgc.py"))
        options, defaults = argparse_options(tree)
        self.assertEqual(options["-t"], ("t", "float"))
        self.assertEqual(options["--lambda"], ("lambda_val", "float"))
        self.assertEqual(options["-b"], ("batch_size", "int"))
        self.assertEqual((defaults["lambda_val"], defaults["t"]), (1000, 0.01))
        self.assertEqual((defaults["lr"], defaults["weight_decay"]), (0.1, 1e-4))
        self.assertEqual(
            readme_overrides("train_eval_cgc.py", options),
            {"arch": "resnet50", "print_freq": 100, "workers": 8, "batch_size": 256,
             "lr": 0.1, "lambda_val": 0.5, "t": 0.5, "save_dir": "<SAVE_DIR>",
             "log_dir": "<LOG_DIR>"},
        )
        self.assertEqual(readme_overrides("baseline_train_eval.py", options), {})

    def test_reference_settings(self):
        """The settings behind each flagfile, as the scripts' code gives them."""
        self.assertEqual(reference_settings("train_eval_cgc.py"), {
            "arch": "resnet50", "batch_size": 256, "epochs": 90, "learning_rate": 0.1,
            "momentum": 0.9, "weight_decay": 1e-4, "weight_decay_mode": "coupled",
            "warmup_epochs": 0, "lambda_": 0.5, "temperature": 0.5, "lr_schedule": "step",
            "lr_decay_factor": 0.1, "lr_decay_epochs": 30, "consistency": "contrastive",
            "transform_min_area": 0.08, "image_size": 224, "views": 3,
        })
        gc = reference_settings("train_eval_gc_l2_no_contrast_baseline.py")
        self.assertEqual((gc["consistency"], gc["lambda_"], gc["arch"]), ("mse", 1000, "resnet18"))
        plain = reference_settings("baseline_train_eval.py")
        self.assertEqual(plain["consistency"], "none")
        self.assertNotIn("lambda_", plain)
        semi = reference_settings("train_imagenet_1pc_swav_cgc_unlabeled.py")
        self.assertEqual(
            {key: semi[key] for key in ("learning_rate", "batch_size", "epochs", "lambda_",
                                        "temperature", "momentum", "weight_decay",
                                        "lr_decay_factor", "lr_decay_milestones")},
            {"learning_rate": 0.02, "batch_size": 128, "epochs": 50, "lambda_": 0.25,
             "temperature": 0.5, "momentum": 0.9, "weight_decay": 0,
             "lr_decay_factor": 0.2, "lr_decay_milestones": [12, 16]},
        )

    def test_flagfiles_copy_what_they_claim(self):
        for name, script in REFERENCE_FLAGFILES.items():
            values, named_script, copies, differs = flagfile(name)
            self.assertEqual(named_script, script, name)
            expected = reference_settings(script)
            for setting in copies:
                self.assertIn(setting, values, f"{name} claims to copy {setting} but sets none")
                self.assertIn(setting, expected, f"{name}: {script} has no {setting} to copy")
                self.assertTrue(
                    _equal(values[setting], expected[setting]),
                    f"{name}: {setting}={values[setting]} but {script} (with the README's "
                    f"command) has {expected[setting]!r}",
                )
            for setting, reason in differs.items():
                self.assertTrue(reason, f"{name}: no reason given for {setting}")
                if setting in values and setting in expected:
                    # A stale "differs" would hide a setting that is copied after all.
                    self.assertFalse(_equal(values[setting], expected[setting]), (name, setting))
            # Every training setting is accounted for, and no claim is left out.
            unclaimed = set(values) - set(copies) - set(differs) - set(LOCATIONS)
            self.assertEqual(unclaimed, set(), name)
            fields = {field.name for field in dataclasses.fields(config_lib.TrainConfig)}
            self.assertEqual(set(values) - fields, set(), name)
            self.assertEqual(set(copies) - set(expected), set(), name)


if __name__ == "__main__":
    tf.test.main()
