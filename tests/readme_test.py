"""The README's user-code example runs as written; CI runs the README's test command."""

import os
import pathlib
import re
import tempfile

import pytest
import tensorflow as tf

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
CI_SCRIPT = README.parent / ".ci" / "run"


class ReadmeTest(tf.test.TestCase):
    @pytest.mark.slow
    def test_user_code_example_runs(self):
        text = README.read_text()
        section = text.split("## Use it from your own code", 1)[1]
        code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
        namespace = {}
        cwd = os.getcwd()
        os.chdir(tempfile.mkdtemp())
        try:
            exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
        finally:
            os.chdir(cwd)
        out = namespace["out"]
        self.assertEqual(out["probabilities"].shape, (4, 10))
        self.assertEqual(out["heatmap"].shape, (4, 64, 64))
        self.assertEqual(
            set(namespace["history"].history),
            {"loss", "ce_loss", "cgc_loss", "accuracy",
             "val_loss", "val_ce_loss", "val_cgc_loss", "val_accuracy"},
        )

    def test_explain_your_own_model_example_runs(self):
        section = README.read_text().split("## Explain your own Keras model", 1)[1]
        code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
        namespace = {}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
        for name in ("heatmaps", "plus", "exact"):
            self.assertEqual(namespace[name].shape, (2, 96, 96), name)
            self.assertEqual(namespace[name].dtype, tf.float32, name)
        # Untrained weights give tiny maps: compare at the scale of the largest value.
        scale = max(float(tf.reduce_max(namespace["heatmaps"])), 1e-30)
        self.assertAllClose(namespace["exact"] / scale, namespace["heatmaps"] / scale, atol=1e-4)
        self.assertEqual(namespace["gini"].shape, (2,))

    def test_ci_runs_exactly_the_readme_test_command(self):
        blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
        commands = [line for block in blocks for line in block.splitlines()]
        # Self-contained: it installs the test dependencies before running pytest.
        test_command = [line for line in commands if line.endswith("pytest -q -n 2 tests")]
        self.assertEqual(
            test_command, ['pip install -e ".[test]" && python -m pytest -q -n 2 tests']
        )
        ci_lines = [line.strip() for line in CI_SCRIPT.read_text().splitlines()]
        self.assertIn(test_command[0], ci_lines)
        self.assertEqual(
            [line for line in ci_lines if "-m pytest" in line and not line.startswith("#")],
            test_command,
        )
        self.assertIn('python -m pytest -q -n 2 -m "not slow" tests', commands)


if __name__ == "__main__":
    tf.test.main()
