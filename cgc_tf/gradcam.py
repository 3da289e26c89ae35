"""Grad-CAM with `tf.GradientTape`, usable inside an outer tape (second order).

Heatmaps float32 [B, h, w] of the class logit z_c at a spatial [B, h, w, k] or
token-grid [B, N, D] target layer, in float32 whatever the compute dtype (finite
second-order gradients under mixed precision). `METHODS`, target layers and
logits: docs/explain.md.
"""

import math

import keras
import tensorflow as tf

EPSILON = 1e-8
METHODS = ("gradcam", "gradcam++", "gradient_x_activation", "closed_form")
# Class and distillation tokens (ViT, DeiT) precede the patch tokens.
MAX_EXTRA_TOKENS = 2


def token_grid(num_tokens, image_size=None):
    """How N tokens map to a patch grid: (extra leading tokens, grid height, width).

    Args:
      num_tokens: int N.
      image_size: optional (H, W) of the input images; the grid then has the
        aspect ratio closest to H / W (within 25%), else it must be square.

    Returns:
      (extra, height, width) with height * width = N - extra > 1, or None.
    """
    if num_tokens is None:
        return None
    for extra in range(MAX_EXTRA_TOKENS + 1):
        count = num_tokens - extra
        if count < 2:
            return None
        if image_size is None or None in tuple(image_size):
            side = math.isqrt(count)
            if side * side == count:
                return extra, side, side
            continue
        aspect = image_size[0] / image_size[1]
        best = min(
            ((height, count // height) for height in range(1, count + 1) if count % height == 0),
            key=lambda grid: abs(math.log(grid[0] / grid[1] / aspect)),
        )
        if abs(math.log(best[0] / best[1] / aspect)) < math.log(1.25):
            return (extra,) + best
    return None


def _static_size(shape):
    """(H, W) of an image shape [B, H, W, C] as ints or None."""
    return tuple(None if d is None else int(d) for d in tuple(shape)[1:3])


def target_kind(shape, image_size=None):
    """"spatial", "tokens" or None: whether a layer output of `shape` can be explained."""
    shape = tuple(shape)
    if len(shape) == 4:
        height, width = shape[1], shape[2]
        if height is not None and width is not None and height * width == 1:
            return None
        return "spatial"
    if len(shape) == 3 and token_grid(shape[1], image_size) is not None:
        return "tokens"
    return None


def to_grid(tensor, image_size=None):
    """[B, h, w, k] unchanged; tokens [B, N, D] -> [B, h, w, D] without the leading extras."""
    if len(tensor.shape) == 4:
        return tensor
    extra, height, width = token_grid(tensor.shape[1], image_size)
    return tf.reshape(tensor[:, extra:], [-1, height, width, tensor.shape[2]])


def _graph_node(layer, model):
    """The Node of `layer`'s single call in `model`'s graph, or None.

    A layer's own `input`/`output` are its first call's, which for a reloaded or
    rebuilt Sequential model belong to a stale graph.
    """
    nodes = list(getattr(layer, "_inbound_nodes", []))
    graph = getattr(model, "_functional", None) or model
    by_depth = getattr(graph, "_nodes_by_depth", None)
    if by_depth is not None:
        in_graph = {id(node) for depth_nodes in by_depth.values() for node in depth_nodes}
        nodes = [node for node in nodes if id(node) in in_graph]
    return nodes[0] if len(nodes) == 1 else None


def layer_output(layer, model=None):
    """The single KerasTensor `layer` outputs in `model`'s graph, or None.

    None for layers with several outputs or called several times in the graph.
    """
    node = _graph_node(layer, model)
    if node is None or len(node.outputs) != 1:
        return None
    output = node.outputs[0]
    return output if isinstance(output, keras.KerasTensor) else None


def _layer_inputs(layer, model):
    """The KerasTensors `layer` takes in `model`'s graph (empty if unknown)."""
    node = _graph_node(layer, model)
    return [] if node is None else list(node.input_tensors)


def target_candidates(model, image_size=None):
    """Names of the layers of `model` whose output Grad-CAM can explain, in graph order.

    Spatial outputs [B, h, w, k] with h * w > 1, and token grids [B, N, D]
    (`token_grid`); the input layer is not a candidate.
    """
    if image_size is None and getattr(model, "inputs", None):
        image_size = _static_size(model.inputs[0].shape)
    names = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        output = layer_output(layer, model)
        if output is not None and target_kind(output.shape, image_size) is not None:
            names.append(layer.name)
    return names


def _is_softmax(activation):
    return activation is keras.activations.softmax or (
        getattr(activation, "__name__", "") == "softmax"
    )


def _is_softmax_layer(layer):
    """True for a `Softmax` layer or an `Activation("softmax")`."""
    return isinstance(layer, keras.layers.Softmax) or (
        isinstance(layer, keras.layers.Activation) and _is_softmax(layer.activation)
    )


class DenseLogits(keras.layers.Layer):
    """The pre-activation of a Dense layer, sharing its weights: x @ kernel + bias.

    Reads the logits of a classifier whose last Dense applies a softmax.
    """

    def __init__(self, dense, **kwargs):
        super().__init__(dtype=dense.dtype_policy, **kwargs)
        self.dense = dense

    def call(self, inputs):
        outputs = keras.ops.matmul(inputs, self.dense.kernel)
        if self.dense.use_bias:
            outputs = outputs + self.dense.bias
        return outputs


def _output_layer(model):
    output = model.outputs[0]
    for layer in reversed(model.layers):
        if layer_output(layer, model) is output:
            return layer
    return None


def logits_output(model):
    """The logits KerasTensor [B, K] of a classifier: what Grad-CAM differentiates.

    Grad-CAM explains the pre-softmax score (Selvaraju et al. 2017): a model
    that ends in a softmax is read before it, either at the input of a final
    `Softmax` / `Activation("softmax")` layer (MobileNetV3) or, for a final
    Dense with a softmax activation (most keras.applications), through
    `DenseLogits`. Any other output is used as it is.

    Raises:
      ValueError: if the model has several outputs, an output that is not
        [B, K], or a softmax folded into a layer other than Dense.
    """
    if len(model.outputs) != 1 or len(model.outputs[0].shape) != 2:
        raise ValueError(
            f"model {model.name!r} must have one output of class scores [B, num_classes]; "
            f"its outputs are {[tuple(t.shape) for t in model.outputs]}"
        )
    layer = _output_layer(model)
    if layer is None:
        return model.outputs[0]
    if _is_softmax_layer(layer):
        return _layer_inputs(layer, model)[0]
    if _is_softmax(getattr(layer, "activation", None)):
        if not isinstance(layer, keras.layers.Dense):
            raise ValueError(
                f"model {model.name!r} ends in {type(layer).__name__} {layer.name!r} with a "
                "softmax activation, whose logits cannot be read; build the model with "
                "logits outputs (e.g. classifier_activation=None)"
            )
        return DenseLogits(layer, name=f"{layer.name}_logits")(_layer_inputs(layer, model)[0])
    return model.outputs[0]


def logits_model(model):
    """`model` itself if it outputs logits; else a model sharing its weights that does.

    For a classifier ending in a softmax (`logits_output`), the returned model
    maps the same inputs to the pre-softmax logits [B, K].
    """
    logits = logits_output(model)
    if logits is model.outputs[0]:
        return model
    return keras.Model(model.inputs, logits, name=f"{model.name}_logits")


def feature_model(model, target_layer):
    """A model sharing `model`'s weights that returns (features, logits).

    Args:
      model: a built functional or Sequential keras.Model, images -> class
        scores [B, K] (logits, or a softmax that `logits_output` bypasses).
      target_layer: name of a layer of `model` with a spatial [B, h, w, k] or
        token-grid [B, N, D] output.

    Returns:
      keras.Model: images -> [features [B, h, w, k] or [B, N, D], logits [B, K]].

    Raises:
      ValueError: if `target_layer` is not such a layer of `model`; the message
        lists the valid layer names.
    """
    candidates = target_candidates(model)
    if target_layer not in candidates:
        raise ValueError(
            f"target_layer={target_layer!r} is not a layer of {model.name!r} with a spatial "
            f"[B, h, w, k] or token-grid [B, N, D] output; the last such layers are "
            f"{candidates[-12:]}"
        )
    features = layer_output(model.get_layer(target_layer), model)
    return keras.Model(
        model.inputs, [features, logits_output(model)], name=f"{model.name}_gradcam"
    )


def _class_index(class_index, logits):
    """int32 [B] explained classes: the argmax of `logits` [B, K] when None."""
    if class_index is None:
        class_index = tf.argmax(logits, axis=-1, output_type=tf.int32)
    class_index = tf.cast(class_index, tf.int32)
    if class_index.shape.rank == 0:
        class_index = tf.fill(tf.shape(logits)[:1], class_index)
    return tf.stop_gradient(class_index)


def cam_from_gradients(features, gradients, method):
    """A class activation map from target-layer activations and dz_c/dF.

    Args:
      features: float32 [B, h, w, k] activations F.
      gradients: float32 [B, h, w, k] dz_c/dF.
      method: "gradient_x_activation", "gradcam" or "gradcam++" (`METHODS`).

    Returns:
      float32 [B, h, w], ReLU'd, not normalised.
    """
    if method == "gradient_x_activation":
        return tf.nn.relu(tf.reduce_sum(gradients * features, axis=-1))
    if method == "gradcam":
        weights = tf.reduce_mean(gradients, axis=[1, 2], keepdims=True)
    elif method == "gradcam++":
        # Chattopadhay et al. 2018, eq. 19 with the score's exponential Y = exp(z_c):
        # its derivatives are exp(z_c) * g^n, and exp(z_c) cancels in
        # alpha = g^2 / (2 g^2 + sum_ab F_ab * g^3). The weights sum alpha * ReLU(dY/dF)
        # over positions; the per-example factor exp(z_c) > 0 is dropped (it
        # overflows float32 for z_c > 88 and does not change the map's shape).
        # Where the denominator is 0 (g = 0) alpha is 0, as in the authors' code.
        squared = tf.square(gradients)
        total = tf.reduce_sum(features, axis=[1, 2], keepdims=True)
        alpha = tf.math.divide_no_nan(squared, 2.0 * squared + total * squared * gradients)
        weights = tf.reduce_sum(alpha * tf.nn.relu(gradients), axis=[1, 2], keepdims=True)
    else:
        raise ValueError(
            f"method={method!r} needs gradients; use one of {METHODS[:3]} here"
        )
    return tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))


def gradcam(extractor, images, class_index=None, training=False, method="gradient_x_activation"):
    """Batched Grad-CAM, differentiable w.r.t. the model weights (second order).

    Call it inside an outer `tf.GradientTape` to train through the heatmaps: the
    inner gradient dz_c/dF is itself recorded. It assumes the layers after the
    target treat examples independently (true at inference, and for pooling +
    dense heads), so the gradient of the summed class logits gives every
    example its own dz_c/dF.

    Args:
      extractor: the model returned by `feature_model`.
      images: float [B, H, W, C], as the model expects.
      class_index: int, int [B] class per example, or None for the predicted class.
      training: forwarded to the model (BatchNorm mode).
      method: "gradient_x_activation" (default, what CGC trains), "gradcam" or
        "gradcam++" (`cam_from_gradients`).

    Returns:
      (logits float32 [B, K], cam float32 [B, h, w] at the feature resolution
      (the patch grid for tokens), class_index int32 [B]).

    Raises:
      ValueError: if the class score does not depend on the target layer.
    """
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        # Watching the input records the ops from the features to the logits
        # even for frozen models, where no variable would be watched.
        tape.watch(images)
        if training:
            features, logits = extractor(images, training=True)
        else:
            features, logits = inference_call(extractor, images)
        logits = tf.cast(logits, tf.float32)
        class_index = _class_index(class_index, logits)
        total = tf.reduce_sum(tf.gather(logits, class_index, axis=1, batch_dims=1))
    gradients = tape.gradient(total, features)
    if gradients is None:
        raise ValueError(
            f"the class scores of {extractor.name!r} do not depend on its target layer's output"
        )
    size = _static_size(images.shape)
    features = to_grid(tf.cast(features, tf.float32), size)
    gradients = to_grid(tf.cast(gradients, tf.float32), size)
    return logits, cam_from_gradients(features, gradients, method), class_index


def _foldable_pairs(model):
    """{id(conv): batch_norm} for Conv2D/DepthwiseConv2D -> BatchNormalization pairs of `model`.

    A pair folds when the convolution (linear activation, channels-last, one
    group, float32) is called once in the graph, its output feeds only the
    BatchNormalization (channels-last, float32) and is not an output of `model`.
    """
    if not hasattr(model, "_run_through_graph") or not hasattr(model, "_nodes_by_depth"):
        return {}
    consumers = {}
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            for tensor in node.input_tensors:
                consumers.setdefault(id(tensor), []).append(node.operation)
    outputs = {id(tensor) for tensor in model.outputs}
    pairs = {}
    for layer in model.layers:
        if type(layer) not in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D):
            continue
        output = layer_output(layer, model)
        following = consumers.get(id(output), []) if output is not None else []
        if (
            output is None
            or id(output) in outputs
            or len(following) != 1
            or not isinstance(following[0], keras.layers.BatchNormalization)
            or layer.activation not in (None, keras.activations.linear)
            or layer.data_format != "channels_last"
            or getattr(layer, "groups", 1) != 1
        ):
            continue
        batch_norm = following[0]
        if (
            batch_norm.axis not in (-1, len(output.shape) - 1)
            or _graph_node(batch_norm, model) is None
            or {layer.compute_dtype, layer.variable_dtype, batch_norm.compute_dtype}
            != {"float32"}
        ):
            continue
        pairs[id(layer)] = batch_norm
    return pairs


def _folded_convolution(convolution, batch_norm):
    """conv(x) followed by inference BatchNorm as one convolution + bias.

    BN(conv(x) + b) = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta
                    = conv_{kernel * s}(x) + (b - mean) * s + beta,
    s = gamma / sqrt(var + eps) per output channel, read from the live variables.
    """

    def call(inputs, **unused_call_context):
        scale = tf.math.rsqrt(batch_norm.moving_variance + batch_norm.epsilon)
        if batch_norm.scale:
            scale = scale * batch_norm.gamma
        shift = -batch_norm.moving_mean * scale
        if convolution.use_bias:
            shift = shift + convolution.bias * scale
        if batch_norm.center:
            shift = shift + batch_norm.beta
        if isinstance(convolution, keras.layers.DepthwiseConv2D):
            # Output channel i * multiplier + m comes from kernel[..., i, m].
            kernel = convolution.kernel * tf.reshape(scale, tf.shape(convolution.kernel)[2:])
            outputs = keras.ops.depthwise_conv(
                inputs,
                kernel,
                strides=convolution.strides,
                padding=convolution.padding,
                data_format=convolution.data_format,
                dilation_rate=convolution.dilation_rate,
            )
        else:
            outputs = keras.ops.conv(
                inputs,
                convolution.kernel * scale,
                strides=convolution.strides,
                padding=convolution.padding,
                data_format=convolution.data_format,
                dilation_rate=convolution.dilation_rate,
            )
        return tf.nn.bias_add(outputs, shift)

    return call


def inference_call(model, images):
    """`model(images, training=False)` with every BatchNorm folded into its convolution.

    Inference BatchNormalization is an affine map per channel, so after a
    convolution it folds into that convolution's kernel and bias (computed in
    the graph from the live variables, so it follows training). The outputs
    equal the model's to float rounding; the saving is the two elementwise
    passes per BatchNorm over the activations, and TensorFlow then fuses the
    convolution, bias and activation (docs/performance.md). Models without
    foldable pairs (`_foldable_pairs`) run unchanged.

    Args:
      model: a functional keras.Model (e.g. from `feature_model`).
      images: float [B, H, W, C].

    Returns:
      the model's outputs (a list for several outputs).
    """
    pairs = _foldable_pairs(model)
    if not pairs:
        return model(images, training=False)
    folded = {id(batch_norm) for batch_norm in pairs.values()}
    inputs = model._standardize_inputs(images)

    def operation_fn(operation):
        if id(operation) in pairs:
            return _folded_convolution(operation, pairs[id(operation)])
        if id(operation) in folded:
            # Its input is the folded convolution's output: BN is already applied.
            return lambda inputs, **unused_call_context: inputs
        if "training" not in getattr(operation, "_call_context_args", ()):
            return operation
        # As keras.Model's own call does: the call's training mode overrides
        # one recorded in the graph.
        return lambda *args, **kwargs: operation(*args, **{**kwargs, "training": False})

    outputs = model._run_through_graph(inputs, operation_fn=operation_fn)
    return outputs[0] if len(outputs) == 1 else outputs


def explain_batch(extractor, images, class_index=None, method="gradcam", dense=None):
    """Heatmaps at the input size: the computation behind every `explain`.

    Args:
      extractor: the model returned by `feature_model`.
      images: float [B, H, W, C], as the model expects.
      class_index: int, int [B], or None for the predicted class.
      method: one of `METHODS`.
      dense: the head's Dense layer (`pooling_dense_head`), required for "closed_form".

    Returns:
      dict: "logits" float32 [B, K], "class_index" int32 [B] (the explained
      classes), "heatmap" float32 [B, H, W] (ReLU'd, bilinearly upsampled, not
      normalised).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if method == "closed_form":
        if dense is None:
            raise ValueError("method='closed_form' needs the head's Dense layer (`dense`)")
        features, logits = inference_call(extractor, images)
        logits = tf.cast(logits, tf.float32)
        class_index = _class_index(class_index, logits)
        cam = closed_form_cam(features, dense.kernel, class_index)
    else:
        logits, cam, class_index = gradcam(extractor, images, class_index, False, method)
    return {
        "logits": logits,
        "class_index": class_index,
        "heatmap": upsample(cam, tf.shape(images)[1:3]),
    }


def upsample(cam, size):
    """Bilinear resize of float32 [B, h, w] heatmaps to `size` = (H, W)."""
    return tf.image.resize(cam[..., None], size, method="bilinear")[..., 0]


def sum_normalize(cam):
    """docs/method.md step 5: cam / (spatial sum + 1e-8) + 1e-8, float32 [B, H, W]."""
    total = tf.reduce_sum(cam, axis=[1, 2], keepdims=True)
    return cam / (total + EPSILON) + EPSILON


def pooling_dense_head(model, target_layer):
    """The Dense layer when `target_layer` -> GlobalAveragePooling2D -> Dense(logits).

    This is the head where Grad-CAM has the closed form of docs/method.md. Dropout
    layers (identities at inference) may sit between the pooling and the Dense;
    the Dense may apply a softmax, or feed a final softmax layer (the logits
    are read before it, `logits_output`). Returns None for any other head.
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
    following = _consumers(model, pooling)
    while len(following) == 1 and isinstance(following[0], keras.layers.Dropout):
        following = _consumers(model, following[0])
    if len(following) == 1 and isinstance(following[0], DenseLogits):
        # `logits_model` of a Dense-softmax head: the logits are the Dense's pre-activation.
        is_output = layer_output(following[0], model) is model.outputs[0]
        return following[0].dense if is_output else None
    if len(following) != 1 or not isinstance(following[0], keras.layers.Dense):
        return None
    dense = following[0]
    linear = dense.activation in (None, keras.activations.linear)
    dense_output = layer_output(dense, model)
    if dense_output is model.outputs[0] and (linear or _is_softmax(dense.activation)):
        return dense
    output_layer = _output_layer(model)
    if (
        linear
        and _is_softmax_layer(output_layer)
        and _layer_inputs(output_layer, model)[0] is dense_output
    ):
        return dense
    return None


def _consumers(model, layer):
    """Layers of `model` that take `layer`'s output as input."""
    output = layer_output(layer, model)
    return [
        candidate
        for candidate in model.layers
        if candidate is not layer
        and any(tensor is output for tensor in _layer_inputs(candidate, model))
    ]


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
