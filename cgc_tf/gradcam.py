"""Grad-CAM with `tf.GradientTape`, usable inside an outer tape (second order).

Grad-CAM here is the gradient-times-activation form of METHOD.md:
`cam[h, w] = ReLU(sum_k dz_c/dF[h, w, k] * F[h, w, k])`, computed in float32
whatever the model's compute dtype, so second-order gradients stay finite
under mixed precision.
"""

import keras
import tensorflow as tf

EPSILON = 1e-8


def _layer_summary(model):
    """Names of the layers with 4-D outputs, the valid Grad-CAM targets."""
    names = []
    for layer in model.layers:
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4:
            names.append(layer.name)
    return names


def default_target_layer(model):
    """The last layer of `model` with a 4-D output (the last convolutional block).

    Raises:
      ValueError: if the model has no 4-D layer.
    """
    candidates = _layer_summary(model)
    if not candidates:
        raise ValueError(f"model {model.name!r} has no layer with a 4-D output to explain")
    return candidates[-1]


def feature_model(model, target_layer):
    """A model sharing `model`'s weights that returns (features, logits).

    Args:
      model: a functional keras.Model, images -> logits [B, K].
      target_layer: name of a layer of `model` with a 4-D output [B, h, w, k].

    Returns:
      keras.Model: images -> [features float [B, h, w, k], logits float [B, K]].

    Raises:
      ValueError: if `target_layer` is not a layer of `model` or is not 4-D; the
        message lists the valid layer names.
    """
    candidates = _layer_summary(model)
    try:
        layer = model.get_layer(target_layer)
    except ValueError:
        layer = None
    if layer is None or target_layer not in candidates:
        shown = candidates[-12:]
        raise ValueError(
            f"target_layer={target_layer!r} is not a layer of {model.name!r} with a 4-D "
            f"output; the last 4-D layers are {shown}"
        )
    if len(model.outputs) != 1 or len(model.outputs[0].shape) != 2:
        raise ValueError(
            f"model {model.name!r} must have one output of logits [B, num_classes]; "
            f"its outputs are {[tuple(t.shape) for t in model.outputs]}"
        )
    return keras.Model(
        model.inputs, [layer.output, model.outputs[0]], name=f"{model.name}_gradcam"
    )


def gradcam(extractor, images, class_index=None, training=False):
    """Batched Grad-CAM, differentiable w.r.t. the model weights (second order).

    Call it inside an outer `tf.GradientTape` to train through the heatmaps: the
    inner gradient dz_c/dF is itself recorded. It assumes the layers after the
    target treat examples independently (true for pooling + dense heads), so the
    gradient of the summed class logits gives every example its own dz_c/dF.

    Args:
      extractor: the model returned by `feature_model`.
      images: float [B, H, W, 3], as the model expects.
      class_index: int [B] class per example, or None for the predicted class.
      training: forwarded to the model (BatchNorm mode).

    Returns:
      (logits float32 [B, K], cam float32 [B, h, w] at the feature resolution,
      class_index int32 [B]).
    """
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        # Watching the input records the ops from the features to the logits
        # even for frozen models, where no variable would be watched.
        tape.watch(images)
        features, logits = extractor(images, training=training)
        logits = tf.cast(logits, tf.float32)
        if class_index is None:
            class_index = tf.argmax(logits, axis=-1, output_type=tf.int32)
        class_index = tf.stop_gradient(tf.cast(class_index, tf.int32))
        selected = tf.gather(logits, class_index, axis=1, batch_dims=1)
        total = tf.reduce_sum(selected)
    gradients = tape.gradient(total, features)
    cam = tf.nn.relu(
        tf.reduce_sum(tf.cast(gradients, tf.float32) * tf.cast(features, tf.float32), axis=-1)
    )
    return logits, cam, class_index


def upsample(cam, size):
    """Bilinear resize of float32 [B, h, w] heatmaps to `size` = (H, W)."""
    return tf.image.resize(cam[..., None], size, method="bilinear")[..., 0]


def sum_normalize(cam):
    """METHOD.md step 5: cam / (spatial sum + 1e-8) + 1e-8, float32 [B, H, W]."""
    total = tf.reduce_sum(cam, axis=[1, 2], keepdims=True)
    return cam / (total + EPSILON) + EPSILON


def pooling_dense_head(model, target_layer):
    """The Dense layer when `target_layer` -> GlobalAveragePooling2D -> Dense(logits).

    This is the head where Grad-CAM has the closed form of METHOD.md. Returns
    None for any other head.
    """
    layer = model.get_layer(target_layer)
    consumers = _consumers(model, layer)
    if len(consumers) != 1 or not isinstance(
        consumers[0], keras.layers.GlobalAveragePooling2D
    ):
        return None
    pooling = consumers[0]
    if pooling.keepdims:
        return None
    dense_layers = _consumers(model, pooling)
    if len(dense_layers) != 1 or not isinstance(dense_layers[0], keras.layers.Dense):
        return None
    dense = dense_layers[0]
    if dense.output is not model.outputs[0]:
        return None
    if dense.activation not in (None, keras.activations.linear):
        return None
    return dense


def _consumers(model, layer):
    """Layers of `model` that take `layer`'s output as input."""
    output = layer.output
    found = []
    for candidate in model.layers:
        if candidate is layer:
            continue
        try:
            inputs = tf.nest.flatten(candidate.input)
        except (AttributeError, ValueError):
            continue
        if any(tensor is output for tensor in inputs):
            found.append(candidate)
    return found


def closed_form_cam(features, kernel, class_index):
    """Exact Grad-CAM for a global-average-pool + dense head, without gradients.

    dz_c/dF[h, w, k] = W[k, c] / (h * w), so cam = ReLU(F . W[:, c]) / (h * w).

    Args:
      features: float [B, h, w, k] target-layer activations.
      kernel: float [k, K] the dense layer's kernel.
      class_index: int [B].

    Returns:
      float32 [B, h, w].
    """
    features = tf.cast(features, tf.float32)
    weights = tf.gather(tf.cast(kernel, tf.float32), class_index, axis=1)  # [k, B]
    area = tf.cast(tf.shape(features)[1] * tf.shape(features)[2], tf.float32)
    return tf.nn.relu(tf.einsum("bhwk,kb->bhw", features, weights)) / area
