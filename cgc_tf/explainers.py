"""`explain`: Grad-CAM heatmaps for any built Keras 3 image classifier.

Works on functional and Sequential models whose output is class logits or a
softmax over them (keras.applications, plain CNNs, ViT-style token models),
batched, inside `tf.function` and under XLA. The arithmetic is `cgc_tf.gradcam`
(shared with `CGCModel.explain` and the export); this module chooses the target
layer (`auto_target_layer`) and the head for the closed form.
"""

import concurrent.futures

import keras
import tensorflow as tf

from cgc_tf import gradcam as gradcam_lib

# Seed of the probe image `auto_target_layer` feeds the model.
_PROBE_SEED = (19, 2018)


def _probe_shape(model, image_size):
    """[1, H, W, C] of the probe image; None dims of the input come from `image_size`."""
    shape = list(model.inputs[0].shape)
    size = tuple(image_size or (None, None))
    for axis in (1, 2):
        if shape[axis] is None:
            shape[axis] = size[axis - 1]
    if len(shape) != 4 or None in shape[1:]:
        raise ValueError(
            f"model {model.name!r} takes inputs of shape {tuple(model.inputs[0].shape)}; "
            "target_layer='auto' needs images [B, H, W, C] of a known size: pass "
            "static-shaped images or a target_layer name"
        )
    return [1] + shape[1:]


def auto_target_layer(model, image_size=None):
    """The last layer with a spatial or token-grid output the class score depends on.

    Candidates are the layers with outputs [B, h, w, k] with h * w > 1 or
    token grids [B, N, D] (`cgc_tf.gradcam.target_candidates`); 1x1 maps,
    such as MobileNetV3's logits convolution, and the logits are never
    candidates. "Depends on" is checked on a seeded probe image: the gradient
    of the top logit must be non-zero at two or more positions of the layer's
    grid. This rejects, e.g., a ViT's layers after its last attention, where
    only the class token reaches the logits (the choice is then the input of
    the last attention block, as Grad-CAM for ViTs prescribes).

    Args:
      model: a built keras.Model, images -> class scores [B, K].
      image_size: optional (H, W) of the images, for models with a variable
        input size.

    Returns:
      str, the layer name.

    Raises:
      ValueError: if no layer qualifies; the message lists the candidates.
    """
    if image_size is None or None in tuple(image_size):
        image_size = tuple(_probe_shape(model, image_size)[1:3])
    candidates = gradcam_lib.target_candidates(model, image_size)
    if not candidates:
        shapes = {
            layer.name: tuple(gradcam_lib.layer_output(layer, model).shape)
            for layer in model.layers
            if gradcam_lib.layer_output(layer, model) is not None
            and len(gradcam_lib.layer_output(layer, model).shape) in (3, 4)
        }
        raise ValueError(
            f"model {model.name!r} has no layer with a spatial [B, h, w, k] (h * w > 1) or "
            f"token-grid [B, N, D] output; its 3-D/4-D layers are {shapes}; pass "
            "target_layer explicitly"
        )
    if tf.executing_eagerly():
        name = _last_dependent_layer(model, candidates, image_size)
    else:
        # Traced by tf.function: the probe must run eagerly, and tf.init_scope
        # would pause its GradientTape, so it runs in a thread of its own
        # (eager by default, and tapes are per thread).
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            name = pool.submit(_last_dependent_layer, model, candidates, image_size).result()
    if name is not None:
        return name
    raise ValueError(
        f"the class score of {model.name!r} depends on no more than one position of any "
        f"candidate layer {candidates[-12:]}; pass target_layer explicitly"
    )


def _last_dependent_layer(model, candidates, image_size):
    """The last candidate with a non-zero top-logit gradient at >= 2 positions, or None."""
    outputs = [gradcam_lib.layer_output(model.get_layer(name), model) for name in candidates]
    probe = keras.Model(model.inputs, outputs + [gradcam_lib.logits_output(model)])
    images = tf.random.stateless_uniform(_probe_shape(model, image_size), seed=_PROBE_SEED)
    with tf.GradientTape() as tape:
        tape.watch(images)
        *features, logits = probe(images, training=False)
        score = tf.reduce_max(tf.cast(logits, tf.float32))
    gradients = tape.gradient(score, features)
    for name, gradient in reversed(list(zip(candidates, gradients))):
        if gradient is None:
            continue
        grid = gradcam_lib.to_grid(tf.cast(gradient, tf.float32), image_size)
        if int(tf.math.count_nonzero(tf.reduce_max(tf.abs(grid), axis=-1))) >= 2:
            return name
    return None


def explain(model, images, class_index=None, target_layer="auto", method="gradcam"):
    """Grad-CAM heatmaps of a Keras classifier at the input size.

    The explained score is the class logit z_c. For a model that ends in a
    softmax (keras.applications' default), it is the pre-softmax logit, read
    at the softmax layer's input or as the last Dense's pre-activation, as
    Grad-CAM prescribes; the probabilities are never differentiated. Token
    features [B, N, D] are reshaped to the patch grid, with the leading class
    (and distillation) tokens dropped. Examples are explained independently
    (inference mode).

    Call it eagerly, or inside `tf.function` (also with jit_compile=True): the
    layer choice and the sub-model are made while tracing, so a wrapped
    function pays them once:
    `fast = tf.function(lambda x: cgc_tf.explain(model, x))`.

    Args:
      model: a built functional or Sequential keras.Model, images -> logits
        or probabilities [B, K].
      images: float [B, H, W, C], as the model expects (preprocessing included).
      class_index: None (the predicted class), an int, or int [B] per example.
      target_layer: a layer name, or "auto" (`auto_target_layer`).
      method: "gradcam" (Selvaraju et al. 2017), "gradcam++" (Chattopadhay et
        al. 2018), "gradient_x_activation" (the form CGC trains) or
        "closed_form" (exact and gradient-free; only for target_layer ->
        GlobalAveragePooling2D -> [Dropout] -> Dense heads, where it equals the
        other three).

    Returns:
      float32 [B, H, W] heatmaps (ReLU'd, bilinearly upsampled, not normalised).

    Raises:
      ValueError: for an unknown method or layer, a layer the score does not
        depend on, or "closed_form" on another head.
    """
    if method not in gradcam_lib.METHODS:
        raise ValueError(f"method={method!r} is not one of {gradcam_lib.METHODS}")
    if not isinstance(model, keras.Model) or not getattr(model, "inputs", None):
        raise ValueError(
            f"model must be a built functional or Sequential keras.Model (call it on a batch "
            f"or give it an Input first); got {type(model).__name__}"
        )
    images = tf.convert_to_tensor(images)
    if not images.dtype.is_floating:
        images = tf.cast(images, tf.float32)
    if images.shape.rank != 4:
        raise ValueError(f"images must be [B, H, W, C]; got shape {images.shape}")
    if target_layer == "auto":
        target_layer = auto_target_layer(model, tuple(images.shape[1:3]))
    extractor = gradcam_lib.feature_model(model, target_layer)
    dense = None
    if method == "closed_form":
        dense = gradcam_lib.pooling_dense_head(model, target_layer)
        if dense is None:
            raise ValueError(
                f"method='closed_form' needs target_layer -> GlobalAveragePooling2D -> Dense "
                f"logits; target_layer={target_layer!r} of {model.name!r} feeds another head; "
                "use method='gradcam'"
            )
    return gradcam_lib.explain_batch(extractor, images, class_index, method, dense)["heatmap"]
