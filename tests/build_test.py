"""The Bazel BUILD graph matches the imports, and imports follow STYLE.md's direction.

Bazel itself cannot see Python imports, so this test is what makes "one
py_library per module" a real check: every cgc_tf import must be a declared
dep, and the declared graph must respect the layering below.
"""

import ast
import pathlib

import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parent.parent

# What each library module may depend on inside cgc_tf (STYLE.md, "Dependency
# direction"); anything absent from a set is forbidden.
ALLOWED = {
    "gradcam": set(),
    "explainers": {"gradcam"},
    "losses": set(),
    "distribute": set(),
    "config": set(),
    "console": set(),
    "visualize": set(),
    "backbones": set(),
    "augment": {"resample"},
    "resample": set(),
    "run_lock": set(),
    "model_dir": set(),
    "schedules": set(),
    "optimizers": set(),
    "model": {"gradcam", "augment", "losses", "distribute", "explainers"},
    "cluttered_digits": set(),
    "elpv": set(),
    "data": {"augment", "config", "cluttered_digits", "elpv"},
    "explanation_metrics": set(),
    "explanation_quality": {"explanation_metrics", "explainers", "metrics", "visualize"},
    "metrics": {"gradcam", "augment", "explanation_metrics"},
    "model_loading": {"model", "model_dir"},
    "evaluation_progress": set(),
    "evaluation_summary": set(),
    "evaluation_grid": {"metrics", "model_loading", "visualize"},
    "evaluation": {
        "metrics", "gradcam", "augment", "visualize", "model", "data", "model_dir",
        "model_loading", "evaluation_progress", "evaluation_summary", "evaluation_grid",
    },
    "paper_protocol": {
        "augment", "backbones", "evaluation", "evaluation_progress", "gradcam", "metrics",
    },
    "callbacks": {"visualize", "gradcam", "model", "model_dir"},
    "custom_loop": {"distribute", "callbacks"},
    "training": {
        "model", "data", "backbones", "metrics", "distribute", "config",
        "callbacks", "custom_loop", "evaluation", "visualize", "gradcam", "augment",
        "run_lock", "schedules", "optimizers", "explainers", "model_dir",
        "training_checks", "training_input",
    },
    "training_checks": {"callbacks", "custom_loop", "data", "model_dir"},
    "training_input": {"data", "model_dir"},
    "serving": {"gradcam", "model", "config", "data"},
    "export": {"model", "gradcam", "config", "serving", "model_dir", "export_verification"},
    "export_verification": {"serving"},
}


# Dataset builders in their own cgc_tf/data/<name>/ packages, one py_library each.
_DATASET_BUILDERS = ("cluttered_digits", "elpv")
_DATASET_PACKAGES = tuple(f"cgc_tf.data.{name}" for name in _DATASET_BUILDERS)


def _library_target(module_path):
    """The py_library of a file: cgc_tf/model.py -> "model", cgc_tf/__init__.py ->
    "cgc_tf", cgc_tf/data/pipeline.py -> "data", cgc_tf/data/cluttered_digits/* ->
    "cluttered_digits" (likewise every builder package under cgc_tf/data/)."""
    parts = module_path.relative_to(ROOT / "cgc_tf").with_suffix("").parts
    if parts == ("__init__",):
        return "cgc_tf"
    if parts[0] == "data" and len(parts) > 2:
        return parts[1]
    return parts[0]


def _cgc_imports(path):
    """Library targets imported by a file (cgc_tf.x, from cgc_tf import x)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "cgc_tf":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith(_DATASET_PACKAGES):
                found.add(node.module.split(".")[2])
            elif node.module == "cgc_tf.data":
                found.update(
                    alias.name if alias.name in _DATASET_BUILDERS else "data"
                    for alias in node.names
                )
            elif node.module.startswith("cgc_tf."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cgc_tf."):
                    found.add(alias.name.split(".")[1])
                elif alias.name == "cgc_tf":
                    found.add("__init__")
    return found


def _external_imports(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _build_rules():
    """Evaluates BUILD with stand-ins for the py_* rules: name -> attributes."""
    rules = {}

    def rule(kind):
        def record(**attributes):
            rules[attributes["name"]] = dict(attributes, kind=kind)

        return record

    namespace = {kind: rule(kind) for kind in ("py_library", "py_binary", "py_test")}
    namespace["package"] = lambda **_: None
    namespace["glob"] = lambda patterns, **_: [
        str(p.relative_to(ROOT)) for pattern in patterns for p in sorted(ROOT.glob(pattern))
    ]
    exec(compile((ROOT / "BUILD").read_text(), "BUILD", "exec"), namespace)  # noqa: S102
    return rules


class BuildGraphTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.rules = _build_rules()
        self.library_files = sorted((ROOT / "cgc_tf").rglob("*.py"))

    def test_every_module_has_a_library_with_its_imports_as_deps(self):
        for path in self.library_files:
            target = _library_target(path)
            self.assertIn(target, self.rules, f"{path} has no py_library {target!r} in BUILD")
            rule = self.rules[target]
            self.assertIn(str(path.relative_to(ROOT)), rule["srcs"], f"{path} not in :{target} srcs")
            deps = {d.lstrip(":") for d in rule.get("deps", [])}
            for imported in _cgc_imports(path) - {target, "__init__"}:
                self.assertIn(imported, deps, f"{path} imports cgc_tf.{imported}; add ':{imported}' to :{target} deps")

    def test_dependency_direction(self):
        for target, allowed in ALLOWED.items():
            if target not in self.rules:
                continue
            deps = {d.lstrip(":") for d in self.rules[target].get("deps", [])}
            self.assertEqual(deps - allowed, set(), f":{target} depends upward on {deps - allowed}")

    def test_library_never_reads_flags_and_keras_cv_stays_in_augment(self):
        for path in self.library_files:
            imports = _external_imports(path)
            self.assertFalse(any(name.startswith("absl.flags") for name in imports), f"{path} imports absl.flags")
            if path.name != "augment.py":
                self.assertFalse(any(name.startswith("keras_cv") for name in imports), f"{path} imports keras_cv")

    def test_every_test_file_has_a_py_test(self):
        for path in sorted((ROOT / "tests").glob("*_test.py")):
            self.assertIn(path.stem, self.rules, f"{path} has no py_test in BUILD")
            self.assertEqual(self.rules[path.stem]["kind"], "py_test")


if __name__ == "__main__":
    tf.test.main()
