"""Verification of exported artefacts: each output compared with the Keras model.

`export_model` moves an artefact into place only when it passes:
`verify_saved_model` and `verify_onnx` run seeded images float32 [B, S, S, 3] in
[0, 1] (and their PNG encodings plus one undecodable element) through the loaded
artefact and `compare` each output with `CGCModel.explain` (GradientTape
Grad-CAM): probabilities [B, K], class_id [B], heatmap [B, H, W], valid [B].
The tolerance rule and the report: docs/export.md#verification-and-export_reportjson.
"""

import json

import numpy as np
import tensorflow as tf

from cgc_tf import serving

# Largest accepted difference from the Keras model: absolute for probabilities,
# relative to the largest reference value for heatmaps.
DEFAULT_TOLERANCE = 1e-4
# Heatmaps are held to max(tolerance, HEATMAP_TOLERANCE): where Grad-CAM's signed
# channel terms cancel, float32 summation order alone moves them by ~1e-4 of the
# maximum (docs/export.md); a real fault differs by O(1).
HEATMAP_TOLERANCE = 1e-3
# Below this heatmap maximum the heatmap comparison is absolute.
HEATMAP_SCALE_FLOOR = 1e-6
VERIFICATION_BATCH_SIZES = (1, 3)
VERIFICATION_SEED = 0
# Appended to the encoded verification batch: must come back valid=False.
INVALID_IMAGE_BYTES = b"not an image"


class VerificationError(RuntimeError):
    """The exported artefacts disagree with the Keras model; `report` has the numbers."""

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


def heatmap_tolerance(tolerance):
    """The heatmaps' relative tolerance for a given `tolerance`: a float."""
    return max(tolerance, HEATMAP_TOLERANCE)


def settings(tolerance):
    """The report's record of how artefacts are verified (tolerance, rule, inputs)."""
    return {
        "tolerance": tolerance,
        "tolerance_semantics": (
            "probabilities: max absolute difference; heatmap: max absolute difference / "
            f"max(largest reference heatmap value, {HEATMAP_SCALE_FLOOR}) <= max(tolerance, "
            f"{HEATMAP_TOLERANCE}), over the rows whose "
            "class_id agrees; class_id may differ only on near ties (top-2 reference "
            "probabilities closer than the tolerance)"
        ),
        "verification_batch_sizes": list(VERIFICATION_BATCH_SIZES),
        "verification_seed": VERIFICATION_SEED,
    }


def _verification_inputs(functions, batch_sizes):
    """Seeded float images and their PNG encodings, one entry per batch size."""
    rng = np.random.default_rng(VERIFICATION_SEED)
    size = functions.image_size
    cases = []
    for batch_size in batch_sizes:
        # Quantised to 8 bits so the PNG round trip is exact.
        pixels = rng.integers(0, 256, size=(batch_size, size, size, 3), dtype=np.uint8)
        images = pixels.astype(np.float32) / 255.0
        encoded = [tf.io.encode_png(image).numpy() for image in pixels]
        class_index = (np.arange(batch_size, dtype=np.int32) + 1) % functions.num_classes
        class_index[0] = -1
        cases.append({"images": images, "encoded": encoded, "class_index": class_index})
    return cases


def _reference(model, images, class_index=None):
    """CGCModel.explain (GradientTape) as numpy; class_index -1 = the prediction."""
    predicted = model.explain(images)
    if class_index is None:
        return {name: value.numpy() for name, value in predicted.items()}
    resolved = np.where(class_index < 0, predicted["class_id"].numpy(), class_index)
    return {name: value.numpy() for name, value in model.explain(images, resolved).items()}


def _bytes_reference(model, functions, encoded, class_index=None):
    views = np.stack([serving.preprocess_encoded(data, functions.image_size) for data in encoded])
    reference = _reference(model, views, class_index)
    # The appended invalid element: zeros, class -1, valid False.
    reference = {
        name: np.concatenate([value, np.zeros_like(value[:1])]) for name, value in reference.items()
    }
    reference["class_id"][-1] = -1
    reference["valid"] = np.array([True] * len(encoded) + [False])
    return reference


def compare(reference, outputs, tolerance, label):
    """Per-output statistics and failure messages of one call of an artefact.

    A class_id may differ from the reference only on a near tie (top-2
    reference probabilities closer than `tolerance`); heatmaps are compared on
    the rows whose class_id agrees, since they explain that class.

    Args:
      reference: dict of numpy arrays from the Keras model: probabilities
        float32 [B, K], class_id int32 [B], optionally heatmap float32
        [B, H, W] and valid bool [B].
      outputs: dict of the artefact's arrays with (at least) the same names.
      tolerance: float > 0, as `export_model`'s.
      label: prefix of the failure messages, e.g. "onnx/explain/batch_3".

    Returns:
      (stats, failures): {output name: {statistic: number}}, list of str
      (empty when the call passes).
    """
    stats, failures = {}, []
    missing = sorted(set(reference) - set(outputs))
    if missing:
        return stats, [f"{label}: outputs {missing} are missing"]
    for name, expected in reference.items():
        if np.shape(outputs[name]) != expected.shape:
            return stats, [
                f"{label}/{name}: shape {np.shape(outputs[name])} != expected {expected.shape}"
            ]
    probabilities = reference["probabilities"]
    valid = reference.get("valid", np.ones(len(probabilities), bool))
    near_tie = np.zeros(len(probabilities), bool)
    if probabilities.shape[-1] > 1:
        top2 = np.sort(probabilities, axis=-1)[:, -2:]
        near_tie = (top2[:, 1] - top2[:, 0]) < tolerance
    same_class = np.asarray(outputs["class_id"]) == reference["class_id"]
    difference = float(np.max(np.abs(outputs["probabilities"] - probabilities), initial=0.0))
    stats["probabilities"] = {"max_abs_diff": difference}
    if not difference <= tolerance:
        failures.append(
            f"{label}/probabilities: max abs difference {difference:.3g} > {tolerance:g}"
        )
    stats["class_id"] = {
        "mismatches": int(np.sum(~same_class & ~near_tie)),
        "near_tie_flips": int(np.sum(~same_class & near_tie)),
    }
    if stats["class_id"]["mismatches"]:
        failures.append(
            f"{label}/class_id: {stats['class_id']['mismatches']} mismatches outside near ties"
        )
    if "valid" in reference:
        mismatches = int(np.sum(np.asarray(outputs["valid"]) != valid))
        stats["valid"] = {"mismatches": mismatches}
        if mismatches:
            failures.append(f"{label}/valid: {mismatches} mismatches")
    if "heatmap" in reference:
        rows = same_class & valid
        actual, expected = np.asarray(outputs["heatmap"])[rows], reference["heatmap"][rows]
        difference = float(np.max(np.abs(actual - expected), initial=0.0))
        scale = max(float(np.max(np.abs(expected), initial=0.0)), HEATMAP_SCALE_FLOOR)
        stats["heatmap"] = {
            "max_abs_diff": difference,
            "max_relative_diff": difference / scale,
            "reference_max": float(np.max(expected, initial=0.0)),
            "rows_compared": int(np.sum(rows)),
        }
        relative_tolerance = heatmap_tolerance(tolerance)
        if not difference / scale <= relative_tolerance:
            failures.append(
                f"{label}/heatmap: max difference relative to the heatmap maximum "
                f"{difference / scale:.3g} > {relative_tolerance:g}"
            )
    return stats, failures


def _merge(total, stats):
    """Worst differences and summed counts over the verification batches."""
    for name, values in stats.items():
        merged = total.setdefault(name, {})
        for key, value in values.items():
            if isinstance(value, int):
                merged[key] = merged.get(key, 0) + value
            else:
                merged[key] = max(merged.get(key, value), value)


def _describe_specs(specs):
    return {
        spec.name if hasattr(spec, "name") and spec.name else key: {
            "dtype": spec.dtype.name,
            "shape": [None if d is None else int(d) for d in spec.shape],
        }
        for key, spec in specs.items()
    }


def verify_saved_model(path, model, functions, metadata, tolerance):
    """Loads a SavedModel and checks every signature against the Keras model.

    Args:
      path: the SavedModel folder.
      model: the exported `cgc_tf.CGCModel` (the reference).
      functions: its `cgc_tf.serving.ServingFunctions`.
      metadata: the dict the `metadata` signature must return.
      tolerance: float > 0, see `compare`.

    Returns:
      dict: "signatures" (input/output names, dtypes, shapes), "differences"
      (per signature, worst over the batches) and "failures" (list of str).
    """
    loaded = tf.saved_model.load(path)
    signatures, failures = {}, []
    for name, signature in loaded.signatures.items():
        _, input_specs = signature.structured_input_signature
        signatures[name] = {
            "inputs": _describe_specs(input_specs),
            "outputs": _describe_specs(signature.structured_outputs),
        }
    stored = json.loads(loaded.signatures[serving.METADATA_SIGNATURE]()["metadata_json"].numpy())
    if stored != json.loads(json.dumps(metadata, sort_keys=True)):
        failures.append("saved_model/metadata: the metadata signature differs from the metadata")
    results = {}
    for case in _verification_inputs(functions, VERIFICATION_BATCH_SIZES):
        images, encoded, class_index = case["images"], case["encoded"], case["class_index"]
        encoded_batch = tf.constant(encoded + [INVALID_IMAGE_BYTES])
        class_batch = np.concatenate([class_index, [-1]]).astype(np.int32)
        expected = _reference(model, images)
        expected_class = _reference(model, images, class_index)
        expected_bytes = _bytes_reference(model, functions, encoded)
        expected_bytes_class = _bytes_reference(model, functions, encoded, class_index)
        calls = {
            "serving_default": (
                {"images": images},
                {k: expected[k] for k in ("probabilities", "class_id")},
            ),
            "explain": ({"images": images}, expected),
            "explain_class": ({"images": images, "class_index": class_index}, expected_class),
            "serving_bytes": (
                {"image_bytes": encoded_batch},
                {k: expected_bytes[k] for k in ("probabilities", "class_id", "valid")},
            ),
            "explain_bytes": ({"image_bytes": encoded_batch}, expected_bytes),
            "explain_bytes_class": (
                {"image_bytes": encoded_batch, "class_index": class_batch},
                expected_bytes_class,
            ),
        }
        for name, (feed, reference) in calls.items():
            label = f"saved_model/{name}/batch_{len(images)}"
            outputs = {k: v.numpy() for k, v in loaded.signatures[name](**feed).items()}
            stats, call_failures = compare(reference, outputs, tolerance, label)
            _merge(results.setdefault(name, {}), stats)
            failures += call_failures
    return {"signatures": signatures, "differences": results, "failures": failures}


def _describe_onnx(arguments):
    """{name: {dtype, shape}} of onnxruntime inputs/outputs; symbolic dims -> None."""
    return {
        argument.name: {
            "dtype": argument.type,
            "shape": [d if isinstance(d, int) else None for d in argument.shape],
        }
        for argument in arguments
    }


def verify_onnx(path, model, functions, batch_size, tolerance):
    """Runs an ONNX `explain` model in onnxruntime and checks it against the Keras model.

    Args:
      path: the .onnx file.
      model: the exported `cgc_tf.CGCModel` (the reference).
      functions: its `cgc_tf.serving.ServingFunctions`.
      batch_size: the ONNX model's static batch size, or None (dynamic: the
        verification batch sizes are used).
      tolerance: float > 0, see `compare`.

    Returns:
      dict: "inputs", "outputs" (names, dtypes, shapes), "metadata_props" (keys),
      "differences" (worst over the batches) and "failures" (list of str).
    """
    import onnx  # Imported here: only the ONNX path needs onnx and onnxruntime.
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    output_names = [output.name for output in session.get_outputs()]
    batch_sizes = VERIFICATION_BATCH_SIZES if batch_size is None else (batch_size,)
    results, failures = {}, []
    for case in _verification_inputs(functions, batch_sizes):
        images = case["images"]
        outputs = dict(zip(output_names, session.run(None, {serving.IMAGES_KEY: images})))
        label = f"onnx/explain/batch_{len(images)}"
        stats, call_failures = compare(_reference(model, images), outputs, tolerance, label)
        _merge(results, stats)
        failures += call_failures
    proto = onnx.load(path, load_external_data=False)
    return {
        "inputs": _describe_onnx(session.get_inputs()),
        "outputs": _describe_onnx(session.get_outputs()),
        "metadata_props": sorted(prop.key for prop in proto.metadata_props),
        "differences": results,
        "failures": failures,
    }


def failure_message(report, tolerance):
    """The `VerificationError` message: every failure of a report, one per line."""
    lines = "\n".join(f"  - {failure}" for failure in report["failures"])
    return (
        f"export verification failed (tolerance={tolerance:g}); nothing was moved into "
        f"{report['export_dir']!r}:\n{lines}"
    )


def format_summary(report):
    """A few human-readable lines about an export report (printed by `cgc-export`)."""
    lines = [
        f"export {'passed' if report['passed'] else 'FAILED'}: version {report['version']} in "
        f"{report['export_dir']}",
        f"  heatmaps: {report['heatmap_method']} (target layer {report['target_layer']!r}), "
        f"{report['num_classes']} classes, input {report['image_size']}x{report['image_size']}",
    ]
    if "saved_model" in report:
        worst = _worst(report["saved_model"]["differences"].values())
        lines.append(
            f"  SavedModel {report.get('saved_model_dir', '(not moved)')}: "
            f"{len(report['saved_model']['signatures'])} signatures; {worst}"
        )
    if "onnx" in report:
        onnx_report = report["onnx"]
        worst = _worst([onnx_report["differences"]])
        lines.append(
            f"  ONNX {report.get('onnx_path', '(not moved)')}: opset {onnx_report['opset']}, "
            f"batch {onnx_report['batch_size']}; {worst}"
        )
    lines += [f"  failure: {failure}" for failure in report["failures"]]
    return "\n".join(lines)


def _worst(differences):
    probabilities = max(
        (d["probabilities"]["max_abs_diff"] for d in differences if "probabilities" in d),
        default=0.0,
    )
    heatmaps = max(
        (d["heatmap"]["max_relative_diff"] for d in differences if "heatmap" in d), default=0.0
    )
    return (
        f"max |probabilities diff| {probabilities:.2g}, max relative heatmap diff {heatmaps:.2g}"
    )
