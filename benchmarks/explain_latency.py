"""Latency of explanations next to plain prediction: Keras, SavedModel, ONNX Runtime.

  python -m benchmarks.explain_latency --arch=resnet18 --image_size=224 --batch_sizes=1,32

For each surface and batch size it times, interleaved (`common.interleaved_times`):
  keras        prediction: `model(images)` in a tf.function;
               explanation: `model.explain(images)` (GradientTape Grad-CAM);
  saved_model  the exported signatures `serving_default` (probabilities,
               class_id) and `explain` (+ heatmap), loaded with tf.saved_model.load;
  onnx         `model.onnx` from `cgc_tf.export.export_model` (the `explain`
               function) in onnxruntime; prediction: the same serving predict
               function converted the same way (`export.onnx_model`).
The export is the real one (`export_model`, verification included) of an
untrained `CGCModel` around the chosen backbone: latency does not depend on
the weights. "heatmap overhead" is the median over rounds of explanation time /
prediction time - 1.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

SURFACES = ("keras", "saved_model", "onnx")

_ARCH = flags.DEFINE_enum(
    "arch", "resnet18", ("small_resnet", "resnet18", "resnet34", "resnet50"), "Backbone."
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input side S in pixels (>= 8).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Number of classes (>= 2).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes to time (each >= 1).")
_SURFACES = flags.DEFINE_list(
    "surfaces", list(SURFACES), f"What to time, a subset of {list(SURFACES)}."
)
_WARMUP_CALLS = flags.DEFINE_integer("warmup_calls", 3, "Untimed calls per function (>= 1).")
_TIMED_CALLS = flags.DEFINE_integer("timed_calls", 20, "Timed calls per function (>= 1).")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "Where to export; default a temporary folder, deleted at the end."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the images.")


def _check_flags():
    try:
        batch_sizes = [int(value) for value in _BATCH_SIZES.value]
    except ValueError:
        batch_sizes = []
    if not batch_sizes or min(batch_sizes) < 1:
        raise app.UsageError(f"--batch_sizes={_BATCH_SIZES.value} must be integers >= 1")
    common.check_subsets((("surfaces", _SURFACES.value, SURFACES),))
    common.check_minimums(
        (
            ("image_size", _IMAGE_SIZE.value, 8),
            ("num_classes", _NUM_CLASSES.value, 2),
            ("warmup_calls", _WARMUP_CALLS.value, 1),
            ("timed_calls", _TIMED_CALLS.value, 1),
        )
    )
    return batch_sizes


def build_model():
    """An untrained, built `CGCModel` around the chosen backbone."""
    import keras
    import numpy as np

    import cgc_tf
    from cgc_tf import backbones

    keras.utils.set_random_seed(_SEED.value)
    size = _IMAGE_SIZE.value
    backbone, target_layer = backbones.build(_ARCH.value, (size, size, 3), _NUM_CLASSES.value)
    model = cgc_tf.CGCModel(backbone, target_layer=target_layer)
    model(np.zeros((1, size, size, 3), np.float32))
    return model


def _predict_onnx(model, path):
    """Converts the serving predict function (no heatmap) to ONNX, as export.write_onnx does.

    `export_model` writes only the `explain` function to ONNX; the prediction
    baseline must be converted by the same route (`export.onnx_model`) to be comparable.
    """
    import onnx
    import tensorflow as tf

    from cgc_tf import export
    from cgc_tf import serving

    functions = serving.ServingFunctions(model)
    function = tf.function(
        functions.predict, input_signature=[serving.float_spec(None, channels=3)], autograph=False
    )
    onnx.save(export.onnx_model(function.get_concrete_function(), export.DEFAULT_OPSET), path)


def _onnx_session(path):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=onnxruntime.get_available_providers())
    return session, session.get_inputs()[0].name


def make_functions(model, export_dir, batch_sizes):
    """dict (surface, batch, "predict" | "explain") -> blocking callable; and export info."""
    import numpy as np
    import tensorflow as tf

    from cgc_tf import export

    surfaces = _SURFACES.value
    rng = np.random.default_rng(_SEED.value)
    images = {
        batch: rng.random((batch, _IMAGE_SIZE.value, _IMAGE_SIZE.value, 3), dtype=np.float32)
        for batch in batch_sizes
    }
    info = {}
    functions = {}
    if "keras" in surfaces:
        predict = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        for batch, array in images.items():
            tensor = tf.constant(array)
            functions[("keras", batch, "predict")] = lambda t=tensor: predict(t).numpy()
            functions[("keras", batch, "explain")] = lambda t=tensor: {
                key: value.numpy() for key, value in model.explain(t).items()
            }
    if "saved_model" in surfaces or "onnx" in surfaces:
        formats = [f for f in ("saved_model", "onnx") if f in surfaces]
        report = export.export_model(model, export_dir, formats=formats, overwrite=True)
        info["heatmap_method"] = report["heatmap_method"]
        info["closed_form"] = report["closed_form"]
    if "saved_model" in surfaces:
        loaded = tf.saved_model.load(report["saved_model_dir"])
        serving_default = loaded.signatures["serving_default"]
        explain = loaded.signatures["explain"]
        for batch, array in images.items():
            tensor = tf.constant(array)
            functions[("saved_model", batch, "predict")] = lambda t=tensor: {
                key: value.numpy() for key, value in serving_default(images=t).items()
            }
            functions[("saved_model", batch, "explain")] = lambda t=tensor: {
                key: value.numpy() for key, value in explain(images=t).items()
            }
    if "onnx" in surfaces:
        predict_path = os.path.join(export_dir, "predict.onnx")
        _predict_onnx(model, predict_path)
        explain_session, explain_input = _onnx_session(report["onnx_path"])
        predict_session, predict_input = _onnx_session(predict_path)
        info["onnx_providers"] = explain_session.get_providers()
        for batch, array in images.items():
            functions[("onnx", batch, "predict")] = lambda a=array: predict_session.run(
                None, {predict_input: a}
            )
            functions[("onnx", batch, "explain")] = lambda a=array: explain_session.run(
                None, {explain_input: a}
            )
    return functions, info


def run(batch_sizes, export_dir):
    """Times every function; returns (machine description, records)."""
    import tensorflow as tf

    description = common.machine_description()
    model = build_model()
    functions, info = make_functions(model, export_dir, batch_sizes)
    records = []
    for surface in _SURFACES.value:
        for batch in batch_sizes:
            # One interleaved timing per (surface, batch): prediction and explanation
            # alternate, so their ratio is measured under the same load.
            pair = {kind: functions[(surface, batch, kind)] for kind in ("predict", "explain")}
            times = common.interleaved_times(pair, _WARMUP_CALLS.value, _TIMED_CALLS.value)
            record = {
                "benchmark": "explain_latency",
                "surface": surface,
                "batch_size": batch,
                "arch": _ARCH.value,
                "image_size": _IMAGE_SIZE.value,
                "num_classes": _NUM_CLASSES.value,
                "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
            }
            predict = common.summarize(times["predict"])
            explain = common.summarize(times["explain"])
            record.update({f"predict_{key}": value for key, value in predict.items()})
            record.update({f"explain_{key}": value for key, value in explain.items()})
            record["predict_median_ms"] = 1000 * predict["median_s"]
            record["explain_median_ms"] = 1000 * explain["median_s"]
            record["heatmap_overhead"] = (
                common.paired_ratio(times["explain"]["wall"], times["predict"]["wall"]) - 1.0
            )
            record["heatmap_cpu_overhead"] = (
                common.paired_ratio(times["explain"]["cpu"], times["predict"]["cpu"]) - 1.0
            )
            if surface == "keras":
                record["heatmap_method"] = "gradient_tape"
            else:
                record["heatmap_method"] = info["heatmap_method"]
            if surface == "onnx":
                record["onnx_providers"] = info["onnx_providers"]
            records.append(record)
    description["load_average_after"] = common.load_average()
    for record in records:
        record["machine"] = description
    return description, records


COLUMNS = [
    ("surface", "surface"),
    ("batch_size", "batch"),
    ("predict_median_ms", "predict ms"),
    ("explain_median_ms", "explain ms"),
    ("heatmap_overhead", "heatmap overhead"),
    ("heatmap_method", "heatmap method"),
]


def main(argv):
    del argv  # Unused.
    import tempfile

    batch_sizes = _check_flags()
    if _EXPORT_DIR.value:
        description, records = run(batch_sizes, _EXPORT_DIR.value)
    else:
        with tempfile.TemporaryDirectory(prefix="explain_latency_") as export_dir:
            description, records = run(batch_sizes, export_dir)
    settings = (
        f"{_ARCH.value} {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}, {_NUM_CLASSES.value} classes; "
        f"{_WARMUP_CALLS.value} warm-up + {_TIMED_CALLS.value} timed calls each, prediction and "
        "explanation interleaved; overhead = median per-round explain/predict - 1"
    )
    common.print_report([common.format_machine(description), settings], records, COLUMNS)


if __name__ == "__main__":
    app.run(main)
