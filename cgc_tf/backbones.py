"""Offline image classifiers (no downloads) with their recommended Grad-CAM layer.

Every builder returns a functional `keras.Model`: float32 images [B, H, W, 3] in
[0, 1] -> logits [B, num_classes], input normalisation as its first layer.
ResNet-18/34/50 are torchvision's architecture layer for layer; `small_resnet` is for
32-48 px images. Layouts and layer names: docs/architecture.md ("Backbones").
"""

import importlib
import re

import keras
import numpy as np
import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Recommended Grad-CAM target layer (the last convolutional block) per builder.
TARGET_LAYERS = {
    "small_resnet": "conv4_block1_out",
    "resnet18": "conv5_block2_out",
    "resnet34": "conv5_block3_out",
    "resnet50": "conv5_block3_out",
}


INPUT_NORMALIZATIONS = ("imagenet", "per_image")


def _normalized_input(input_shape, input_normalization="imagenet"):
    """Returns (input tensor, normalised tensor).

    "imagenet" subtracts the ImageNet channel means and divides by their standard
    deviations (what pretrained weights expect). "per_image" standardises every
    channel of every image over its pixels (zero mean, unit variance), which makes
    the network start invariant to an image's colours and contrast: on cluttered
    digits, whose foreground and background colours are random, it is what lets a
    small network leave chance level within a few epochs (docs/method.md).
    """
    if input_normalization not in INPUT_NORMALIZATIONS:
        raise ValueError(
            f"input_normalization={input_normalization!r} is not known; choose one of "
            f"{INPUT_NORMALIZATIONS}"
        )
    inputs = keras.Input(shape=input_shape, name="image")
    if input_normalization == "per_image":
        # Instance normalisation of the input, without learned scale or offset.
        x = keras.layers.LayerNormalization(
            axis=(1, 2), center=False, scale=False, epsilon=1e-3, name="per_image_normalization"
        )(inputs)
        return inputs, x
    variance = [s * s for s in IMAGENET_STD]
    x = keras.layers.Normalization(
        mean=list(IMAGENET_MEAN), variance=variance, name="imagenet_normalization"
    )(inputs)
    return inputs, x


# Block layouts of `basic_resnet` (see its docstring).
LAYOUTS = ("torchvision", "keras")
# torch.nn.BatchNorm2d's defaults: eps 1e-5 and momentum 0.1, which is Keras'
# momentum 0.9 (Keras weighs the old moving statistic, torch the new batch one).
_TORCH_BATCH_NORM = {"epsilon": 1e-5, "momentum": 0.9}
# keras.applications' values (Keras' default momentum 0.99).
_KERAS_BATCH_NORM = {"epsilon": 1.001e-5}


def _torch_conv(x, filters, kernel_size, stride, name):
    """Conv2D without bias, padded as torch pads (kernel_size // 2 on every side).

    TF's padding="same" pads (0 before, 1 after) for a stride-2 3x3 convolution of
    an even input, torch pads (1, 1): identical weights would give feature maps
    shifted by one input pixel. Explicit zero padding + "valid" is torch's layout.
    """
    if kernel_size > 1:
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        use_bias=False,
        # torchvision's init: kaiming_normal_(mode="fan_out", nonlinearity="relu").
        kernel_initializer=keras.initializers.VarianceScaling(
            2.0, "fan_out", "untruncated_normal"
        ),
        name=f"{name}_conv",
    )(x)


@keras.saving.register_keras_serializable(package="cgc_tf")
class BatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` computed by TensorFlow's fused kernel.

    Same arguments, variables (names, shapes, dtypes), moving-statistics update
    (`moving = momentum * moving + (1 - momentum) * batch`, the biased batch
    variance) and outputs to float rounding, for channels-last inputs [B, H, W, C]
    of dtype float16 or bfloat16, or float32 (below) (statistics and the affine map in
    float32, output in the input's dtype). Keras 3 normalises with about ten
    elementwise and reduction ops in float32 and casts a half-precision input up
    and back down; the fused kernel (`FusedBatchNormV3`, its gradient
    `FusedBatchNormGradV3`) is one op each way and reads the half-precision
    tensor directly. Under `mixed_bfloat16` the unfused layer was the largest
    share of a ResNet training step on the CPU (docs/performance.md).

    By default (`fused=None`) only half-precision inputs take the kernel; float32
    inputs run Keras' own code. In float32 the kernel's (oneDNN's) gradients are
    rounded differently enough to matter against the reference: on
    tests/reference_parity_test.py's CGC step they move the parameter gradients
    past that test's norm tolerance, which Keras' path stays within
    (docs/performance.md). Under mixed precision the bfloat16 rounding of the
    activations dominates either way. `fused=True` takes the kernel for float32
    too (a faster float32 step), `fused=False` never.

    Anything the kernel does not cover runs Keras' own code: other ranks or axes,
    float64, masks, batch renormalisation, and `synchronized=True` (batch
    statistics all-reduced over replicas).

    The class keeps Keras' name because Keras' `.weights.h5` files key a
    functional model's layers by their class name (`layers/batch_normalization_3`):
    weights saved with `keras.layers.BatchNormalization` load into it and back.
    `.keras` files record it as "cgc_tf>BatchNormalization".
    """

    def __init__(self, fused=None, **kwargs):
        if fused not in (None, True, False):
            raise ValueError(f"fused={fused!r} must be None, True or False")
        super().__init__(**kwargs)
        self.fused = fused

    def get_config(self):
        return {**super().get_config(), "fused": self.fused}

    def _fused(self, inputs, mask):
        half = (tf.float16, tf.bfloat16)
        dtypes = half if self.fused is None else (tf.float32, *half)
        return (
            self.fused is not False
            and mask is None
            and not self.synchronized
            and not self.renorm
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and tf.as_dtype(inputs.dtype) in dtypes
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fused(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        channels = (inputs.shape[-1],)
        scale = self.gamma if self.scale else tf.ones(channels, tf.float32)
        offset = self.beta if self.center else tf.zeros(channels, tf.float32)
        # As Keras: a frozen layer (trainable=False) normalises with its moving statistics.
        if training and self.trainable:
            empty = tf.constant([], tf.float32)
            outputs, mean, variance = tf.raw_ops.FusedBatchNormV3(
                x=inputs,
                scale=scale,
                offset=offset,
                mean=empty,
                variance=empty,
                epsilon=self.epsilon,
                exponential_avg_factor=1.0,
                data_format="NHWC",
                is_training=True,
            )[:3]
            # The kernel normalises with the biased batch variance but returns the
            # unbiased one (x n / (n - 1)); Keras' moving variance tracks the biased.
            count = tf.cast(tf.size(inputs, out_type=tf.int64) // channels[0], tf.float32)
            variance = variance * (tf.maximum(count - 1.0, 1.0) / count)
            self.moving_mean.assign(
                self.moving_mean * self.momentum + mean * (1.0 - self.momentum)
            )
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
            )
        else:
            outputs = tf.raw_ops.FusedBatchNormV3(
                x=inputs,
                scale=scale,
                offset=offset,
                mean=self.moving_mean,
                variance=self.moving_variance,
                epsilon=self.epsilon,
                exponential_avg_factor=1.0,
                data_format="NHWC",
                is_training=False,
            )[0]
        return tf.cast(outputs, self.compute_dtype)


def _torch_batch_norm(x, name):
    return BatchNormalization(**_TORCH_BATCH_NORM, name=name)(x)


def _basic_block(x, filters, stride, name, layout):
    """ResNet basic block (two 3x3 convs) with a projection shortcut when needed."""
    shortcut = x
    if layout == "torchvision":
        if stride != 1 or x.shape[-1] != filters:
            shortcut = _torch_conv(x, filters, 1, stride, f"{name}_0")
            shortcut = _torch_batch_norm(shortcut, f"{name}_0_bn")
        x = _torch_conv(x, filters, 3, stride, f"{name}_1")
        x = _torch_batch_norm(x, f"{name}_1_bn")
        x = keras.layers.Activation("relu", name=f"{name}_1_relu")(x)
        x = _torch_conv(x, filters, 3, 1, f"{name}_2")
        # gamma starts at 1, as torchvision's default zero_init_residual=False.
        x = _torch_batch_norm(x, f"{name}_2_bn")
    else:
        if stride != 1 or x.shape[-1] != filters:
            shortcut = keras.layers.Conv2D(
                filters, 1, strides=stride, use_bias=False, name=f"{name}_0_conv"
            )(x)
            shortcut = BatchNormalization(**_KERAS_BATCH_NORM, name=f"{name}_0_bn")(shortcut)
        x = keras.layers.Conv2D(
            filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_1_conv"
        )(x)
        x = BatchNormalization(**_KERAS_BATCH_NORM, name=f"{name}_1_bn")(x)
        x = keras.layers.Activation("relu", name=f"{name}_1_relu")(x)
        x = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=False, name=f"{name}_2_conv"
        )(x)
        # gamma starts at 0: each block starts as the identity.
        x = BatchNormalization(
            **_KERAS_BATCH_NORM, gamma_initializer="zeros", name=f"{name}_2_bn"
        )(x)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def _bottleneck_block(x, filters, stride, name):
    """torchvision's Bottleneck (ResNet v1.5): 1x1, 3x3 with the stride, 1x1 (x4)."""
    shortcut = x
    if stride != 1 or x.shape[-1] != 4 * filters:
        shortcut = _torch_conv(x, 4 * filters, 1, stride, f"{name}_0")
        shortcut = _torch_batch_norm(shortcut, f"{name}_0_bn")
    x = _torch_conv(x, filters, 1, 1, f"{name}_1")
    x = _torch_batch_norm(x, f"{name}_1_bn")
    x = keras.layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = _torch_conv(x, filters, 3, stride, f"{name}_2")
    x = _torch_batch_norm(x, f"{name}_2_bn")
    x = keras.layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = _torch_conv(x, 4 * filters, 1, 1, f"{name}_3")
    x = _torch_batch_norm(x, f"{name}_3_bn")
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def _torch_stem(x, filters):
    """7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max-pool, all padded as torch (/4).

    torch pads the max-pool with -inf; zeros are equivalent after the ReLU.
    """
    x = _torch_conv(x, filters, 7, 2, "conv1")
    x = _torch_batch_norm(x, "conv1_bn")
    x = keras.layers.Activation("relu", name="conv1_relu")(x)
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)


def _torch_head(x, num_classes):
    """Global average pool and torch.nn.Linear (with torch's default init)."""
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    # torch.nn.Linear: weight and bias uniform in +-1/sqrt(fan_in).
    bound = 1.0 / float(x.shape[-1]) ** 0.5
    return keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
        bias_initializer=keras.initializers.RandomUniform(-bound, bound),
        name="predictions",
    )(x)


def basic_resnet(
    input_shape,
    num_classes,
    blocks_per_stage,
    filters_per_stage,
    stem_filters=64,
    stem_downsample=True,
    input_normalization="imagenet",
    layout="torchvision",
    name="resnet",
):
    """Builds a ResNet of basic blocks.

    Args:
      input_shape: (H, W, 3) of the float32 images in [0, 1].
      num_classes: number of logits.
      blocks_per_stage: blocks in each stage, e.g. (2, 2, 2, 2) for ResNet-18.
      filters_per_stage: channels of each stage, e.g. (64, 128, 256, 512).
      stem_filters: channels of the stem convolution.
      stem_downsample: ImageNet stem (7x7 stride 2 + max-pool, /4) when True;
        a 3x3 stride-1 stem for small images when False.
      input_normalization: "imagenet" (channel mean/std of ImageNet) or
        "per_image" (every image's channels standardised over its pixels).
      layout: "torchvision" (torchvision's ResNet: convolutions padded
        symmetrically, kaiming-normal init, BN epsilon 1e-5 and torch momentum
        0.1, last BN gamma of each block initialised to 1, torch's Linear init) or
        "keras" (TF padding="same", Keras initialisers, BN epsilon 1.001e-5 and
        Keras momentum 0.99, last BN gamma of each block initialised to 0).
      name: model name.

    Returns:
      A functional keras.Model, images -> logits float32 [B, num_classes]. The
      last block of stage s (1-based, counting from conv2) is `conv{s+1}_block{n}_out`.
    """
    if len(blocks_per_stage) != len(filters_per_stage):
        raise ValueError(
            f"blocks_per_stage {blocks_per_stage} and filters_per_stage "
            f"{filters_per_stage} must have the same length"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not known; choose one of {LAYOUTS}")
    inputs, x = _normalized_input(input_shape, input_normalization)
    if stem_downsample and layout == "torchvision":
        x = _torch_stem(x, stem_filters)
    elif layout == "torchvision":
        x = _torch_conv(x, stem_filters, 3, 1, "conv1")
        x = _torch_batch_norm(x, "conv1_bn")
        x = keras.layers.Activation("relu", name="conv1_relu")(x)
    else:
        if stem_downsample:
            x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(x)
            x = keras.layers.Conv2D(
                stem_filters, 7, strides=2, use_bias=False, name="conv1_conv"
            )(x)
        else:
            x = keras.layers.Conv2D(
                stem_filters, 3, padding="same", use_bias=False, name="conv1_conv"
            )(x)
        x = BatchNormalization(**_KERAS_BATCH_NORM, name="conv1_bn")(x)
        x = keras.layers.Activation("relu", name="conv1_relu")(x)
        if stem_downsample:
            x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
            x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage, (blocks, filters) in enumerate(zip(blocks_per_stage, filters_per_stage)):
        for block in range(blocks):
            stride = 2 if (stage > 0 and block == 0) else 1
            x = _basic_block(
                x, filters, stride, name=f"conv{stage + 2}_block{block + 1}", layout=layout
            )
    if layout == "torchvision":
        logits = _torch_head(x, num_classes)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        logits = keras.layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(inputs, logits, name=name)


def small_resnet(input_shape=(48, 48, 3), num_classes=10, weights=None):
    """A 3-stage ResNet (79K parameters) for small images such as cluttered digits.

    Its input is standardised per image ("per_image" normalisation), not with
    ImageNet statistics. Target layer: `conv4_block1_out` (H/4 x W/4 x 64).
    """
    model = basic_resnet(
        input_shape,
        num_classes,
        blocks_per_stage=(1, 1, 1),
        filters_per_stage=(16, 32, 64),
        stem_filters=16,
        stem_downsample=False,
        input_normalization="per_image",
        layout="keras",
        name="small_resnet",
    )
    return _maybe_load(model, weights)


def resnet18(input_shape=(224, 224, 3), num_classes=1000, weights=None):
    """ResNet-18; target layer `conv5_block2_out` (7x7x512 at 224)."""
    model = basic_resnet(
        input_shape, num_classes, (2, 2, 2, 2), (64, 128, 256, 512), name="resnet18"
    )
    return _maybe_load(model, weights)


def resnet34(input_shape=(224, 224, 3), num_classes=1000, weights=None):
    """ResNet-34; target layer `conv5_block3_out`."""
    model = basic_resnet(
        input_shape, num_classes, (3, 4, 6, 3), (64, 128, 256, 512), name="resnet34"
    )
    return _maybe_load(model, weights)


def resnet50(input_shape=(224, 224, 3), num_classes=1000, weights=None):
    """torchvision's ResNet-50 (v1.5: the stride is in the 3x3 convolution of the
    bottleneck, no conv biases); keras.applications' layer names; target layer
    `conv5_block3_out` (7x7x2048 at 224)."""
    inputs, x = _normalized_input(input_shape)
    x = _torch_stem(x, 64)
    for stage, (blocks, filters) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for block in range(blocks):
            stride = 2 if (stage > 0 and block == 0) else 1
            x = _bottleneck_block(x, filters, stride, name=f"conv{stage + 2}_block{block + 1}")
    model = keras.Model(inputs, _torch_head(x, num_classes), name="resnet50")
    return _maybe_load(model, weights)


BUILDERS = {
    "small_resnet": small_resnet,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}


def build(arch, input_shape, num_classes, weights=None, synchronized_batch_norm=False):
    """Builds a backbone by name.

    Args:
      arch: a key of `BUILDERS`; a keras.applications model name (e.g.
        "MobileNetV2", built with weights=None and logits outputs); or
        "module:callable", called as callable(input_shape=..., num_classes=...)
        and returning a keras.Model.
      input_shape: (H, W, 3).
      num_classes: int, the logits' width.
      weights: optional local `.weights.h5` file.
      synchronized_batch_norm: bool; True makes every BatchNormalization layer
        compute its training-mode batch statistics over all replicas of the
        current tf.distribute strategy (Keras `synchronized=True`: an all-reduce
        per layer and step), so replicas also update their moving statistics
        identically. No effect outside a strategy.

    Returns:
      (model, target_layer_name), the name None for other than `BUILDERS` (the
      caller chooses: `cgc_tf.explainers.auto_target_layer`).
    """
    if arch in BUILDERS:
        model = BUILDERS[arch](input_shape=input_shape, num_classes=num_classes, weights=weights)
        target_layer = TARGET_LAYERS[arch]
    else:
        model, target_layer = _build_other(arch, input_shape, num_classes), None
        if weights is not None:
            # As the builders load: layers whose shapes differ (a new head) are skipped.
            model.load_weights(weights, skip_mismatch=True)
    if synchronized_batch_norm:
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                # Read at call time (and saved by get_config); no variable changes.
                layer.synchronized = True
    return model, target_layer


def _build_other(arch, input_shape, num_classes):
    """A keras.applications model by name (weights=None, logits) or `module:callable`."""
    if ":" in arch:
        module_name, _, attribute = arch.partition(":")
        try:
            builder = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"arch={arch!r}: cannot import {attribute!r} from {module_name!r}: {error}")
        model = builder(input_shape=input_shape, num_classes=num_classes)
        if not isinstance(model, keras.Model):
            raise ValueError(f"arch={arch!r} returned {type(model).__name__}, not a keras.Model")
        return model
    if arch[:1].isupper() and callable(getattr(keras.applications, arch, None)):
        return getattr(keras.applications, arch)(
            weights=None, input_shape=input_shape, classes=num_classes, classifier_activation=None
        )
    raise ValueError(
        f"arch={arch!r} is not known; choose one of {sorted(BUILDERS)}, a keras.applications "
        "model name (e.g. 'MobileNetV2') or 'module:callable' (called with input_shape, num_classes)"
    )


# Keras weight name -> torch parameter/buffer name suffix.
_TORCH_WEIGHT_NAMES = {
    "kernel": "weight",
    "bias": "bias",
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}
_BLOCK_LAYER = re.compile(r"conv(\d+)_block(\d+)_(\d)_(conv|bn)")


def torchvision_name(path):
    """torchvision's ResNet name of a weight of our ResNet-18/34/50.

    E.g. "conv2_block1_1_conv/kernel" -> "layer1.0.conv1.weight",
    "conv3_block1_0_bn/moving_variance" -> "layer2.0.downsample.1.running_var",
    "predictions/kernel" -> "fc.weight".

    Args:
      path: a Keras variable path "<layer name>/<weight name>".

    Raises:
      ValueError: if the layer has no torchvision counterpart.
    """
    layer, weight = path.split("/")[-2:]
    match = _BLOCK_LAYER.fullmatch(layer)
    if weight not in _TORCH_WEIGHT_NAMES:
        module = None
    elif layer == "predictions":
        module = "fc"
    elif layer in ("conv1_conv", "conv1_bn"):
        module = "conv1" if layer == "conv1_conv" else "bn1"
    elif match:
        stage, block, index, kind = match.groups()
        prefix = f"layer{int(stage) - 1}.{int(block) - 1}"
        if index == "0":
            module = f"{prefix}.downsample.{0 if kind == 'conv' else 1}"
        else:
            module = f"{prefix}.{kind}{index}"
    else:
        module = None
    if module is None:
        raise ValueError(
            f"path={path!r} has no torchvision ResNet counterpart; expected "
            "'<conv1_conv|conv1_bn|convS_blockB_I_conv|..._bn|predictions>/<weight>'"
        )
    return f"{module}.{_TORCH_WEIGHT_NAMES[weight]}"


def to_torch_layout(array):
    """A Keras weight (or its gradient) in torch's layout, as a numpy array.

    Conv kernels [kh, kw, in, out] -> [out, in, kh, kw]; dense kernels [in, out] ->
    [out, in]; vectors unchanged.
    """
    array = np.asarray(array)
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if array.ndim == 2:
        return array.T
    return array


def torchvision_state_dict(model):
    """The weights of our resnet18/34/50 as a torchvision ResNet state dict.

    Args:
      model: a model built by `resnet18`, `resnet34` or `resnet50`.

    Returns:
      dict torchvision name -> float32 numpy array in torch's layout; every
      parameter and BN running statistic (not `num_batches_tracked`). Load it with
      `torch_model.load_state_dict({k: torch.from_numpy(v) ...}, strict=False)`.
    """
    return {
        torchvision_name(variable.path): to_torch_layout(variable.numpy())
        for variable in model.weights
    }


def _maybe_load(model, weights):
    """Loads a local `.weights.h5` file; layers whose shapes differ (a new head) are skipped."""
    if weights is None:
        return model
    if not str(weights).endswith(".weights.h5"):
        raise ValueError(
            f"weights={weights!r}: expected a local Keras weights file ending in '.weights.h5' "
            "(nothing is downloaded)"
        )
    model.load_weights(weights, skip_mismatch=True)
    return model
