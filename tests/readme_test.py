"""The README's user-code example runs as written."""

import os
import pathlib
import re
import tempfile

import tensorflow as tf

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


class ReadmeTest(tf.test.TestCase):
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


if __name__ == "__main__":
    tf.test.main()
