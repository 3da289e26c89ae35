"""cgc-export: export a trained CGC model as a verified SavedModel and ONNX.

  cgc-export --model_dir=cgc_runs/cluttered_digits        # what cgc-train --model_dir wrote
  cgc-export --model=model.keras --export_dir=/srv/models/cgc --version=2

Writes <export_dir>/<version>/ (TF Serving layout), <export_dir>/model.onnx and
<export_dir>/export_report.json, and prints the report summary. The logic is
`cgc_tf.export.export_from_path`; this file only parses flags.
"""

import os
import sys

# Before TensorFlow is imported: hide its C++ INFO and WARNING lines unless asked for.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from cgc_tf import console  # noqa: E402
from cgc_tf import export  # noqa: E402
from cgc_tf import export_verification  # noqa: E402

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "A cgc-train --model_dir (holds model.keras); or give --model."
)
_MODEL = flags.DEFINE_string(
    "model", None, "A trained model: a .keras file or a training model_dir holding model.keras."
)
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir",
    None,
    "Destination folder; default <model_dir>/export (or export/ beside the .keras file).",
)
_VERSION = flags.DEFINE_integer(
    "version", 1, "SavedModel version, the TF Serving folder name <export_dir>/<version>/ (>= 0)."
)
_FORMATS = flags.DEFINE_list(
    "formats", list(export.FORMATS), f"Artefacts to write, a subset of {list(export.FORMATS)}."
)
_OPSET = flags.DEFINE_integer(
    "opset",
    export.DEFAULT_OPSET,
    f"ONNX opset, >= {export.MIN_OPSET} (up to what tf2onnx supports).",
)
_ONNX_BATCH_SIZE = flags.DEFINE_integer(
    "onnx_batch_size",
    None,
    "Static batch size of the ONNX model (>= 1). Required when the target layer does not feed "
    "global-average-pooling + dense (GradientTape heatmaps); unset = dynamic batch.",
)
_TOLERANCE = flags.DEFINE_float(
    "tolerance",
    export.DEFAULT_TOLERANCE,
    "Largest accepted difference from the Keras model (> 0): absolute for probabilities, "
    "relative to the heatmap maximum for heatmaps (there at least "
    f"{export_verification.HEATMAP_TOLERANCE:g}, float32 cancellation; docs/export.md).",
)
_CLASS_NAMES_FILE = flags.DEFINE_string(
    "class_names_file", None, "Text file with one class name per line; default '0'...'K-1'."
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace an existing <export_dir>/<version>/ folder."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    if bool(_MODEL.value) == bool(_MODEL_DIR.value):
        raise app.UsageError(
            "give exactly one of --model_dir (a cgc-train model_dir) or --model (a .keras file)"
        )
    if _MODEL_DIR.value and not os.path.isdir(_MODEL_DIR.value):
        raise app.UsageError(f"--model_dir={_MODEL_DIR.value!r} is not a directory")
    console.setup(verbose=flags.FLAGS["verbosity"].present)
    try:
        report = export.export_from_path(
            _MODEL_DIR.value or _MODEL.value,
            export_dir=_EXPORT_DIR.value,
            class_names_file=_CLASS_NAMES_FILE.value,
            version=_VERSION.value,
            formats=tuple(_FORMATS.value),
            opset=_OPSET.value,
            onnx_batch_size=_ONNX_BATCH_SIZE.value,
            tolerance=_TOLERANCE.value,
            overwrite=_OVERWRITE.value,
        )
    except export.VerificationError as error:
        print(export.format_summary(error.report))
        sys.exit(f"cgc-export: {error}")
    except (ValueError, FileExistsError, OSError) as error:
        sys.exit(f"cgc-export: {error}")
    print(export.format_summary(report))


def run():
    """Console-script entry point (cgc-export)."""
    console.prepare_binary(flags.FLAGS, sys.modules[__name__])
    app.run(main)


if __name__ == "__main__":
    run()
