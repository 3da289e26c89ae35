"""Images/s of `cgc_tf.explain` against tf-keras-vis `Gradcam`, and how right each is.

  python -m benchmarks.explain_throughput --models=ResNet50:16,MobileNetV2:32 --image_size=224

For each keras.applications model (`weights=None`, softmax output, 1000 classes)
and batch size, in one process:
  ours   `tf.function(lambda x: cgc_tf.explain(model, x, target_layer=layer))`,
         heatmaps of the predicted class at the input size (the softmax is
         bypassed to the logits);
  peer   tf-keras-vis `Gradcam(model, model_modifier=ReplaceToLinear())` called
         with the same layer (`seek_penultimate_conv_layer=False`) and class,
         its defaults otherwise (heatmaps resized to the input and min-max
         normalised), as its documentation recommends for softmax models.
The layer is `cgc_tf.explainers.auto_target_layer`'s choice. Both are timed
interleaved (`common.interleaved_times`); images/s = batch / median seconds;
"speedup" = the median per-round peer/ours time ratio.

Correctness, per example (the minimum over the batch is reported): cosine
similarity of the heatmaps with a plain `tf.GradientTape` Grad-CAM oracle on a
logits twin of the model (same weights, no softmax) in float32, and in float64
(`--float64_oracle`): ours at the input size (both bilinearly resized by
TensorFlow), the peer at the feature map (`expand_cam=False`,
`normalize_cam=False`: scipy's zoom and the min-max shift would otherwise count
as disagreement). "peer default" is tf-keras-vis called as in its README,
`Gradcam(model)` without arguments: the layer it then uses is shown.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

_MODELS = flags.DEFINE_list(
    "models",
    ["ResNet50:16", "MobileNetV2:32"],
    "keras.applications names with batch sizes, NAME:BATCH (batch >= 1).",
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input side S in pixels (>= 32).")
_WARMUP_CALLS = flags.DEFINE_integer("warmup_calls", 2, "Untimed calls per function (>= 1).")
_TIMED_CALLS = flags.DEFINE_integer("timed_calls", 5, "Timed calls per function (>= 1).")
_FLOAT64_ORACLE = flags.DEFINE_bool(
    "float64_oracle", True, "Also compare with a float64 GradientTape oracle."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the images.")


def parse_models(values):
    """["ResNet50:16", ...] -> [("ResNet50", 16), ...]; raises app.UsageError."""
    import keras

    parsed = []
    for value in values:
        name, _, batch = value.partition(":")
        if not hasattr(keras.applications, name) or not batch.isdigit() or int(batch) < 1:
            raise app.UsageError(
                f"--models entry {value!r} must be NAME:BATCH with NAME a keras.applications "
                "model (e.g. ResNet50) and BATCH >= 1"
            )
        parsed.append((name, int(batch)))
    return parsed


def build_application(name, image_size, activation="softmax", dtype=None):
    """keras.applications `name` with weights=None; `dtype` e.g. "float64" for an oracle."""
    import keras

    previous = keras.config.dtype_policy()
    if dtype is not None:
        keras.config.set_dtype_policy(dtype)
    try:
        return getattr(keras.applications, name)(
            weights=None,
            input_shape=(image_size, image_size, 3),
            classes=1000,
            classifier_activation=activation,
        )
    finally:
        keras.config.set_dtype_policy(previous)


def tape_gradcam(logits_model, layer_index, images, class_index, size=None):
    """Grad-CAM by a plain GradientTape: float64 numpy [B, h, w] (or [B, H, W] with `size`).

    Args:
      logits_model: a keras.Model with logits outputs (any float dtype).
      layer_index: index in `logits_model.layers` of the target layer.
      images: float [B, H, W, C].
      class_index: int [B].
      size: optional (H, W): resize bilinearly (TensorFlow) before returning.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    layer = logits_model.layers[layer_index]
    sub = keras.Model(logits_model.inputs, [layer.output, logits_model.outputs[0]])
    images = tf.cast(images, logits_model.inputs[0].dtype)
    with tf.GradientTape() as tape:
        features, logits = sub(images, training=False)
        # Examples are independent at inference: one backward pass for the batch.
        score = tf.reduce_sum(tf.gather(logits, class_index, axis=1, batch_dims=1))
    gradients = tape.gradient(score, features)
    weights = tf.reduce_mean(gradients, axis=[1, 2], keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
    if size is not None:
        cam = tf.image.resize(cam[..., None], size, method="bilinear")[..., 0]
    return np.asarray(cam, np.float64)


def cosines(first, second):
    """Per-example cosine similarity of two [B, ...] arrays, float64 [B] (0 for a zero map)."""
    import numpy as np

    first = np.asarray(first, np.float64).reshape(len(first), -1)
    second = np.asarray(second, np.float64).reshape(len(second), -1)
    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    return np.where(norms > 0, np.sum(first * second, axis=1) / np.maximum(norms, 1e-300), 0.0)


def peer_gradcam(model, linear=True):
    """tf-keras-vis Gradcam; `linear` = ReplaceToLinear (explains logits, as we do)."""
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear

    if linear:
        return Gradcam(model, model_modifier=ReplaceToLinear(), clone=True)
    return Gradcam(model)


def peer_call(peer, images, class_index, layer=None, **kwargs):
    """The peer's heatmaps as numpy; `layer` None = its default choice."""
    from tf_keras_vis.utils.scores import CategoricalScore

    import numpy as np

    if layer is not None:
        kwargs.update(penultimate_layer=layer, seek_penultimate_conv_layer=False)
    return np.asarray(peer(CategoricalScore(list(np.asarray(class_index))), images, **kwargs))


def peer_default_layer(model):
    """The layer tf-keras-vis' Gradcam uses without arguments: the last Conv layer."""
    from tf_keras_vis.utils import find_layer
    from tf_keras_vis.utils.model_modifiers import Conv

    return find_layer(model, lambda layer: isinstance(layer, Conv), offset=model.layers[-1]).name


def correctness(model, logits_twin, layer, images, float64_twin=None):
    """Cosines with the GradientTape oracles (minimum over the batch) and the classes.

    Args:
      model: the softmax model both tools explain.
      logits_twin: the same weights without softmax, for the oracle.
      layer: the target layer's name.
      images: float32 [B, H, W, 3].
      float64_twin: optional float64 copy of `logits_twin`.

    Returns:
      (dict of float cosines, int32 [B] explained classes).
    """
    import numpy as np

    import cgc_tf

    layer_index = model.layers.index(model.get_layer(layer))
    class_index = np.argmax(np.asarray(logits_twin(images, training=False)), axis=-1)
    size = tuple(images.shape[1:3])
    ours = cgc_tf.explain(model, images, target_layer=layer).numpy()
    oracle = tape_gradcam(logits_twin, layer_index, images, class_index)
    oracle_resized = tape_gradcam(logits_twin, layer_index, images, class_index, size)
    results = {"ours_oracle_cosine": float(cosines(ours, oracle_resized).min())}
    if float64_twin is not None:
        oracle64 = tape_gradcam(float64_twin, layer_index, images, class_index, size)
        results["ours_oracle64_cosine"] = float(cosines(ours, oracle64).min())
    maps = dict(expand_cam=False, normalize_cam=False)
    peer = peer_call(peer_gradcam(model), images, class_index, layer, **maps)
    results["peer_oracle_cosine"] = float(cosines(peer, oracle).min())
    default = peer_gradcam(model, linear=False)
    default_maps = peer_call(default, images, class_index, **maps)
    results["peer_default_layer"] = peer_default_layer(model)
    default_oracle = tape_gradcam(
        logits_twin,
        model.layers.index(model.get_layer(results["peer_default_layer"])),
        images,
        class_index,
    )
    results["peer_default_vs_ours_cosine"] = float(
        cosines(default_maps, oracle).min() if default_maps.shape == oracle.shape else float("nan")
    )
    results["peer_default_oracle_cosine"] = float(cosines(default_maps, default_oracle).min())
    return results, class_index.astype(np.int32)


def run_model(name, batch_size):
    """One record: throughput of both tools and their correctness on one model."""
    import keras
    import numpy as np
    import tensorflow as tf

    import cgc_tf

    size = _IMAGE_SIZE.value
    keras.utils.set_random_seed(_SEED.value)
    model = build_application(name, size)
    logits_twin = build_application(name, size, activation=None)
    logits_twin.set_weights(model.get_weights())
    float64_twin = None
    if _FLOAT64_ORACLE.value:
        float64_twin = build_application(name, size, activation=None, dtype="float64")
        float64_twin.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    rng = np.random.default_rng(_SEED.value)
    array = (255.0 * rng.random((batch_size, size, size, 3))).astype(np.float32)
    images = tf.constant(array)
    layer = cgc_tf.explainers.auto_target_layer(model)
    record = {
        "benchmark": "explain_throughput",
        "model": name,
        "batch_size": batch_size,
        "image_size": size,
        "layer": layer,
    }
    results, class_index = correctness(model, logits_twin, layer, images, float64_twin)
    record.update(results)
    del float64_twin, logits_twin

    ours = tf.function(lambda x: cgc_tf.explain(model, x, target_layer=layer))
    peer = peer_gradcam(model)
    functions = {
        "ours": lambda: ours(images).numpy(),
        "peer": lambda: peer_call(peer, array, class_index, layer),
    }
    times = common.interleaved_times(functions, _WARMUP_CALLS.value, _TIMED_CALLS.value)
    for key in functions:
        summary = common.summarize(times[key])
        record[f"{key}_median_s"] = summary["median_s"]
        record[f"{key}_images_per_s"] = batch_size / summary["median_s"]
    record["speedup"] = common.paired_ratio(times["peer"]["wall"], times["ours"]["wall"])
    record["cpu_speedup"] = common.paired_ratio(times["peer"]["cpu"], times["ours"]["cpu"])
    return record


COLUMNS = [
    ("model", "model"),
    ("batch_size", "batch"),
    ("layer", "layer"),
    ("ours_images_per_s", "ours img/s"),
    ("peer_images_per_s", "tf-keras-vis img/s"),
    ("speedup", "speedup"),
    ("ours_oracle_cosine", "ours~oracle"),
    ("ours_oracle64_cosine", "ours~float64"),
    ("peer_oracle_cosine", "peer~oracle"),
    ("peer_default_vs_ours_cosine", "peer default~oracle"),
    ("peer_default_layer", "peer default layer"),
]


def main(argv):
    del argv  # Unused.
    models = parse_models(_MODELS.value)
    common.check_minimums(
        (
            ("image_size", _IMAGE_SIZE.value, 32),
            ("warmup_calls", _WARMUP_CALLS.value, 1),
            ("timed_calls", _TIMED_CALLS.value, 1),
        )
    )
    description = common.machine_description()
    records = [run_model(name, batch) for name, batch in models]
    description["load_average_after"] = common.load_average()
    for record in records:
        record["machine"] = description
    settings = (
        f"{_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}, weights=None, 1000 classes; "
        f"{_WARMUP_CALLS.value} warm-up + {_TIMED_CALLS.value} timed calls each, interleaved; "
        "cosines: minimum over the batch"
    )
    common.print_report([common.format_machine(description), settings], records, COLUMNS)


if __name__ == "__main__":
    app.run(main)
