"""Export a `CGCModel` for serving: a SavedModel (TF Serving layout) and ONNX, verified.

`export_model(model, export_dir, version=1)` writes `export_dir/<version>/` (SavedModel),
`model.onnx` and `export_report.json`. Inputs: images float32 [B, H, W, 3] in [0, 1] or
image_bytes string [B]; outputs: probabilities [B, K], class_id [B], heatmap [B, H, W].
A version is verified in a hidden staging folder before it is moved into place, so a
server never sees an unverified one. Layout, signatures and tolerances: docs/export.md.
"""

import datetime
import json
import os
import platform
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

import cgc_tf
from cgc_tf import export_verification as verification
from cgc_tf import model_dir as layout
from cgc_tf import serving
from cgc_tf.model import CGCModel

SAVED_MODEL = "saved_model"
ONNX = "onnx"
FORMATS = (SAVED_MODEL, ONNX)
DEFAULT_OPSET = 17
# Oldest opset accepted: Resize with half-pixel coordinates and Einsum behave as
# TensorFlow's from opset 13 on; the newest is what tf2onnx supports.
MIN_OPSET = 13
# Re-exported: export_model's default, its error and the report's summary.
DEFAULT_TOLERANCE = verification.DEFAULT_TOLERANCE
VerificationError = verification.VerificationError
format_summary = verification.format_summary
ONNX_FILENAME = "model.onnx"
REPORT_FILENAME = "export_report.json"
METADATA_FILENAME = "metadata.json"


# ------------------------------------------------------------------ loading
def load_model(model_path):
    """Loads a trained `CGCModel` from a `.keras` file or a training model_dir.

    Args:
      model_path: a `.keras` file, or a directory holding `model.keras` (the
        layout written by training, see docs/architecture.md).

    Returns:
      The `CGCModel`.

    Raises:
      ValueError: if the path is neither, or does not hold a `CGCModel`.
    """
    model = layout.load_model(model_path)
    if not isinstance(model, CGCModel):
        raise ValueError(
            f"model_path={layout.model_file(model_path)!r} holds a {type(model).__name__}, not "
            "a cgc_tf.CGCModel; wrap a classifier with cgc_tf.CGCModel(backbone, "
            "target_layer=...) before saving it"
        )
    return model


def read_class_names(path):
    """Class names from a text file, one per line (blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def default_export_dir(model_path):
    """`<model_dir>/export` for a model_dir, `<folder of the file>/export` for a .keras file."""
    path = os.fspath(model_path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, layout.EXPORT_DIR)


def export_from_path(
    model_path,
    export_dir=None,
    class_names_file=None,
    version=1,
    formats=FORMATS,
    opset=DEFAULT_OPSET,
    onnx_batch_size=None,
    tolerance=DEFAULT_TOLERANCE,
    overwrite=False,
):
    """Loads a trained model and exports it: the library side of `cgc-export`.

    Args:
      model_path: a `.keras` file or a training model_dir (see `load_model`).
      export_dir: destination; default `default_export_dir(model_path)`.
      class_names_file: optional text file with one class name per line.
      version, formats, opset, onnx_batch_size, tolerance, overwrite: as
        `export_model`.

    Returns:
      The export report (dict), as written to export_report.json. The metadata
      records the source path and, for a model_dir, its config.json.
    """
    model = load_model(model_path)
    class_names = read_class_names(class_names_file) if class_names_file else None
    extra = {"source": os.path.abspath(os.fspath(model_path))}
    config_path = os.path.join(os.fspath(model_path), layout.CONFIG_FILE)
    if os.path.isdir(os.fspath(model_path)) and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            extra["training_config"] = json.load(f)
    return export_model(
        model,
        export_dir or default_export_dir(model_path),
        version=version,
        class_names=class_names,
        formats=formats,
        opset=opset,
        onnx_batch_size=onnx_batch_size,
        tolerance=tolerance,
        overwrite=overwrite,
        extra_metadata=extra,
    )


# ------------------------------------------------------------------- export
def export_model(
    model,
    export_dir,
    version=1,
    class_names=None,
    formats=FORMATS,
    opset=DEFAULT_OPSET,
    onnx_batch_size=None,
    tolerance=DEFAULT_TOLERANCE,
    overwrite=False,
    extra_metadata=None,
):
    """Exports `model` as a SavedModel and ONNX, verifies both, writes the report.

    Args:
      model: a built `cgc_tf.CGCModel`.
      export_dir: destination folder (created if needed).
      version: SavedModel version, an int >= 0 (TF Serving's `<dir>/<version>/`).
      class_names: list of K strings; default "0" ... "K-1".
      formats: any of ("saved_model", "onnx").
      opset: ONNX opset, in [13, the newest tf2onnx supports].
      onnx_batch_size: static batch size of the ONNX model. Required when the
        heatmap needs the GradientTape (the target layer does not feed global
        pooling + dense): tf2onnx cannot convert its gradient ops with a dynamic
        batch. None (the default) keeps the batch dynamic for the closed form.
      tolerance: largest accepted difference from the Keras model (absolute for
        probabilities, relative to the heatmaps' maximum for heatmaps).
      overwrite: replace an existing `<version>` folder.
      extra_metadata: optional JSON-serialisable dict stored in the metadata
        under "extra" (e.g. the training config).

    Returns:
      The report (dict) also written to `export_dir/export_report.json`.

    Raises:
      ValueError: on invalid arguments, or an ONNX conversion that produced ops
        onnxruntime cannot run.
      FileExistsError: if `<version>` exists and `overwrite` is False.
      VerificationError: if an artefact differs from the model by more than
        `tolerance` (nothing is moved into `export_dir` then; the report with
        "passed": false is still written).
    """
    functions = _checked_functions(model)
    formats = tuple(formats)
    class_names = _check_arguments(
        functions, version, class_names, formats, opset, onnx_batch_size, tolerance
    )
    export_dir = os.path.abspath(os.fspath(export_dir))
    version_dir = os.path.join(export_dir, str(version))
    if SAVED_MODEL in formats and os.path.exists(version_dir) and not overwrite:
        raise FileExistsError(
            f"{version_dir!r} already exists; choose another version (got version={version}) "
            "or pass overwrite=True"
        )
    metadata = _metadata(model, functions, class_names, version, formats, extra_metadata)
    os.makedirs(export_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".staging-{version}-", dir=export_dir)
    try:
        report = _export_and_verify(
            model, functions, metadata, staging, formats, opset, onnx_batch_size, tolerance
        )
        report.update(export_dir=export_dir, version=version)
        if not report["passed"]:
            layout.write_json(os.path.join(export_dir, REPORT_FILENAME), report)
            raise VerificationError(verification.failure_message(report, tolerance), report)
        if SAVED_MODEL in formats:
            if os.path.exists(version_dir):
                shutil.rmtree(version_dir)
            os.rename(os.path.join(staging, SAVED_MODEL), version_dir)
            report["saved_model_dir"] = version_dir
        if ONNX in formats:
            onnx_path = os.path.join(export_dir, ONNX_FILENAME)
            os.replace(os.path.join(staging, ONNX_FILENAME), onnx_path)
            report["onnx_path"] = onnx_path
        layout.write_json(os.path.join(export_dir, REPORT_FILENAME), report)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _checked_functions(model):
    if not isinstance(model, CGCModel):
        raise ValueError(
            f"model must be a cgc_tf.CGCModel, got {type(model).__name__}; wrap a classifier "
            "with cgc_tf.CGCModel(backbone, target_layer=...)"
        )
    return serving.ServingFunctions(model)


def _max_opset():
    from tf2onnx import constants  # Imported here: only the ONNX path needs tf2onnx.

    return max(constants.OPSET_TO_IR_VERSION)


def _check_arguments(functions, version, class_names, formats, opset, batch_size, tolerance):
    """Validates every argument at once; returns the class names to use."""
    errors = []
    num_classes = functions.num_classes
    if not (isinstance(version, int) and not isinstance(version, bool) and version >= 0):
        errors.append(f"version={version!r} must be an integer >= 0 (TF Serving's version folder)")
    if not formats or any(f not in FORMATS for f in formats):
        errors.append(f"formats={formats!r} must be a non-empty subset of {FORMATS}")
    if ONNX in formats:
        maximum = _max_opset()
        if not (isinstance(opset, int) and MIN_OPSET <= opset <= maximum):
            errors.append(f"opset={opset!r} must be an integer in [{MIN_OPSET}, {maximum}]")
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
            errors.append(f"onnx_batch_size={batch_size!r} must be an integer >= 1 or None")
        if batch_size is None and not functions.closed_form:
            errors.append(
                "onnx_batch_size is required: the target layer "
                f"{functions.model.target_layer!r} does not feed global-average-pooling + "
                "dense, so heatmaps use the GradientTape Grad-CAM, whose gradient ops tf2onnx "
                "converts only with a static batch; pass onnx_batch_size=N (--onnx_batch_size) "
                "or formats=('saved_model',)"
            )
    if not (isinstance(tolerance, (int, float)) and tolerance > 0):
        errors.append(f"tolerance={tolerance!r} must be a number > 0")
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    elif len(class_names) != num_classes or not all(
        isinstance(name, str) and name for name in class_names
    ):
        errors.append(
            f"class_names must be {num_classes} non-empty strings (one per logit); got "
            f"{len(class_names)}: {list(class_names)[:5]}..."
        )
    if errors:
        raise ValueError("Invalid export arguments:\n" + "\n".join(f"  - {e}" for e in errors))
    return list(class_names)


def _metadata(model, functions, class_names, version, formats, extra_metadata):
    metadata = {
        "cgc_tf_version": cgc_tf.__version__,
        "model_name": model.name,
        "backbone": model.backbone.name,
        "class_names": class_names,
        "num_classes": functions.num_classes,
        "image_size": functions.image_size,
        "target_layer": model.target_layer,
        "heatmap_method": "closed_form" if functions.closed_form else "gradient_tape",
        "preprocessing": serving.PREPROCESSING,
        "version": version,
        "signatures": sorted(functions.signatures()) + [serving.METADATA_SIGNATURE],
        "formats": list(formats),
    }
    if extra_metadata is not None:
        metadata["extra"] = extra_metadata
    # Fails here, before any writing, if extra_metadata is not JSON-serialisable.
    json.dumps(metadata)
    return metadata


def write_saved_model(functions, metadata, path):
    """Writes the SavedModel with every signature and assets.extra/metadata.json.

    Args:
      functions: `cgc_tf.serving.ServingFunctions`.
      metadata: JSON-serialisable dict, also returned by the `metadata` signature.
      path: destination folder (must not exist).
    """
    # keras.export.ExportArchive tracks exactly the Keras variables the
    # functions use and writes every endpoint as a signature.
    archive = keras.export.ExportArchive()
    archive.track(functions.backbone)
    for name, (function, specs) in functions.signatures().items():
        archive.add_endpoint(name, function, input_signature=specs)
    metadata_json = json.dumps(metadata, sort_keys=True)
    archive.add_endpoint(
        serving.METADATA_SIGNATURE,
        lambda: {"metadata_json": tf.constant(metadata_json)},
        input_signature=[],
    )
    archive.write_out(path, verbose=False)
    extra = os.path.join(path, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    layout.write_json(os.path.join(extra, METADATA_FILENAME), metadata)


def onnx_model(concrete_function, opset=DEFAULT_OPSET):
    """Converts a concrete TensorFlow function to ONNX with tf2onnx.

    The function is frozen first, so its captured constants (e.g. a
    Normalization layer's mean) become graph constants: the ONNX inputs are its
    arguments only, named, like the outputs, after its structured signature.

    Args:
      concrete_function: a `tf.types.experimental.ConcreteFunction`, e.g. from
        `tf.function(..., input_signature=...).get_concrete_function()`.
      opset: ONNX opset, in [13, the newest tf2onnx supports].

    Returns:
      The `onnx.ModelProto`. Ops tf2onnx cannot convert are left in place as
      TensorFlow ops (tf2onnx does not fail on them): callers check the graph.
    """
    import tf2onnx  # Imported here: only the ONNX path needs tf2onnx.

    # tf2onnx.convert.from_function declares every non-variable capture of the
    # function as an extra ONNX input, so freeze first and name only the real
    # arguments as inputs.
    arguments = len(tf.nest.flatten(concrete_function.structured_input_signature))
    input_names = [tensor.name for tensor in concrete_function.inputs[:arguments]]
    output_names = [tensor.name for tensor in concrete_function.outputs]
    graph_def = tf2onnx.tf_loader.from_function(concrete_function, input_names, output_names)
    proto, _ = tf2onnx.convert.from_graph_def(
        graph_def,
        name=concrete_function.name,
        input_names=input_names,
        output_names=output_names,
        opset=opset,
        tensors_to_rename=tf2onnx.convert.tensor_names_from_structed(
            concrete_function, input_names, output_names
        ),
    )
    return proto


def write_onnx(
    functions, metadata, path, opset=DEFAULT_OPSET, batch_size=None, signature="explain"
):
    """Converts a float-input serving function to ONNX with tf2onnx.

    Args:
      functions: `cgc_tf.serving.ServingFunctions`.
      metadata: dict stored as the model's metadata_props (non-strings as JSON).
      path: the .onnx file to write.
      opset: ONNX opset.
      batch_size: static batch size, or None for a dynamic batch.
      signature: "explain" (what `export_model` writes) or "serving_default"
        (probabilities and class_id only).

    Raises:
      ValueError: if the converted graph holds ops that ONNX does not define
        (tf2onnx leaves unconvertible TensorFlow ops in place instead of failing).
    """
    import onnx  # Imported here: only the ONNX path needs onnx.

    # Same Python function as the SavedModel signature; ONNX declares 3 channels
    # so onnxruntime itself rejects other counts (tf2onnx drops Assert ops).
    float_functions = {"explain": functions.explain, "serving_default": functions.predict}
    if signature not in float_functions:
        raise ValueError(f"signature={signature!r} must be one of {sorted(float_functions)}")
    function = tf.function(
        float_functions[signature],
        input_signature=[serving.float_spec(batch_size, channels=3)],
        autograph=False,
    )
    proto = onnx_model(function.get_concrete_function(), opset)
    unsupported = sorted(
        {
            node.op_type
            for node in proto.graph.node
            if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type)
        }
    )
    if unsupported:
        raise ValueError(
            f"tf2onnx could not convert the TensorFlow ops {unsupported} of the "
            f"{metadata['heatmap_method']} heatmap of target_layer="
            f"{metadata['target_layer']!r} (opset={opset}, onnx_batch_size={batch_size}); "
            "export with formats=('saved_model',) or choose a target layer feeding "
            "global-average-pooling + dense"
        )
    props = {
        key: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        for key, value in metadata.items()
    }
    props["onnx_batch_size"] = "dynamic" if batch_size is None else str(batch_size)
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, path)


# ------------------------------------------------------ export and verification
def _export_and_verify(model, functions, metadata, staging, formats, opset, batch_size, tolerance):
    """Writes the artefacts into `staging`, verifies them; returns the report."""
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(formats),
        "closed_form": functions.closed_form,
        "heatmap_method": metadata["heatmap_method"],
        "image_size": functions.image_size,
        "num_classes": functions.num_classes,
        "class_names": metadata["class_names"],
        "target_layer": metadata["target_layer"],
        "formats": list(formats),
        **verification.settings(tolerance),
        "failures": [],
    }
    saved_model_path = os.path.join(staging, SAVED_MODEL)
    onnx_path = os.path.join(staging, ONNX_FILENAME)
    # ONNX first: its conversion fails fast on unconvertible heads.
    if ONNX in formats:
        write_onnx(functions, metadata, onnx_path, opset, batch_size)
    if SAVED_MODEL in formats:
        write_saved_model(functions, metadata, saved_model_path)
        report["saved_model"] = verification.verify_saved_model(
            saved_model_path, model, functions, metadata, tolerance
        )
        report["failures"] += report["saved_model"].pop("failures")
    if ONNX in formats:
        report["onnx"] = verification.verify_onnx(
            onnx_path, model, functions, batch_size, tolerance
        )
        report["onnx"].update(
            opset=opset, batch_size="dynamic" if batch_size is None else batch_size
        )
        report["failures"] += report["onnx"].pop("failures")
    report["passed"] = not report["failures"]
    return report


def _versions(formats):
    versions = {
        "cgc_tf": cgc_tf.__version__,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }
    if ONNX in formats:
        import onnx
        import onnxruntime
        import tf2onnx

        versions.update(
            onnx=onnx.__version__, onnxruntime=onnxruntime.__version__, tf2onnx=tf2onnx.__version__
        )
    return versions

