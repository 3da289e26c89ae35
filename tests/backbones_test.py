"""Backbones: offline builds, recommended target layers, local weights."""

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from cgc_tf import backbones
from cgc_tf import gradcam


class BackbonesTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(
        ("small_resnet", 32, (8, 8, 64)),
        ("resnet18", 64, (2, 2, 512)),
        ("resnet34", 64, (2, 2, 512)),
        ("resnet50", 64, (2, 2, 2048)),
    )
    def test_builds_with_target_layer(self, arch, size, feature_shape):
        model, target_layer = backbones.build(arch, (size, size, 3), num_classes=5)
        self.assertEqual(model.output.shape[-1], 5)
        self.assertEqual(tuple(model.get_layer(target_layer).output.shape[1:]), feature_shape)
        self.assertIsNotNone(gradcam.pooling_dense_head(model, target_layer))
        logits = model(np.zeros((1, size, size, 3), np.float32))
        self.assertEqual(logits.shape, (1, 5))

    def test_keras_applications_and_module_callable_archs(self):
        model, target_layer = backbones.build("MobileNetV3Small", (32, 32, 3), num_classes=3)
        self.assertIsNone(target_layer)  # the caller picks it (explainers.auto_target_layer)
        self.assertEqual(model.output.shape[-1], 3)
        # Logits: the classifier activation is off.
        self.assertIs(gradcam.logits_output(model), model.outputs[0])
        model, target_layer = backbones.build(
            "cgc_tf.backbones:small_resnet", (32, 32, 3), num_classes=4
        )
        self.assertIsNone(target_layer)
        self.assertEqual(model.name, "small_resnet")
        for arch, pattern in (
            ("NoSuchNet", "arch='NoSuchNet' is not known"),
            ("cgc_tf.backbones:nothing", "cannot import 'nothing'"),
            ("builtins:dict", "arch='builtins:dict' returned dict, not a keras.Model"),
        ):
            with self.assertRaisesRegex(ValueError, pattern):
                backbones.build(arch, (32, 32, 3), num_classes=3)

    def test_parameter_counts(self):
        model, _ = backbones.build("resnet18", (224, 224, 3), num_classes=1000)
        # torchvision's ResNet-18 has 11,689,512 parameters; Keras counts BN
        # moving statistics too (9,600 of them).
        self.assertEqual(model.count_params(), 11_689_512 + 9_600)

    def test_torchvision_parameter_counts(self):
        # torchvision's published counts (BN gamma/beta included, no conv biases);
        # Keras adds the BN moving statistics as non-trainable weights.
        for arch, count in (("resnet34", 21_797_672), ("resnet50", 25_557_032)):
            model, _ = backbones.build(arch, (64, 64, 3), num_classes=1000)
            trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
            self.assertEqual(trainable, count, arch)

    def test_stride_two_convolutions_pad_as_torch(self):
        # A kernel reading only its top-left tap outputs the padded input at (2i, 2j),
        # i.e. input (2i - 1, 2j - 1) with torch's one-pixel padding on every side
        # (TF's "same" would give input (2i, 2j) on this even input).
        model, _ = backbones.build("resnet18", (64, 64, 3), num_classes=2)
        pad = model.get_layer("conv3_block1_1_pad")
        conv = model.get_layer("conv3_block1_1_conv")
        kernel = np.zeros(conv.kernel.shape, np.float32)
        kernel[0, 0, 0, 0] = 1.0
        conv.kernel.assign(kernel)
        strided = keras.Model(pad.input, conv.output)
        features = np.random.default_rng(0).normal(size=(1, 16, 16, 64)).astype(np.float32)
        expected = np.zeros((1, 8, 8), np.float32)
        expected[:, 1:, 1:] = features[:, 1:-1:2, 1:-1:2, 0]
        self.assertAllClose(strided(features)[..., 0], expected)

    @parameterized.parameters("resnet18", "resnet50")
    def test_batch_norm_as_torch(self, arch):
        model, _ = backbones.build(arch, (64, 64, 3), num_classes=2)
        norms = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
        self.assertNotEmpty(norms)
        for layer in norms:
            self.assertEqual((layer.epsilon, layer.momentum), (1e-5, 0.9), layer.name)
            # torchvision's zero_init_residual=False: every gamma starts at 1.
            self.assertAllEqual(layer.gamma, np.ones(layer.gamma.shape), layer.name)

    def test_resnet50_strides_in_the_three_by_three(self):
        model, _ = backbones.build("resnet50", (64, 64, 3), num_classes=2)
        self.assertEqual(model.get_layer("conv3_block1_1_conv").strides, (1, 1))
        self.assertEqual(model.get_layer("conv3_block1_2_conv").strides, (2, 2))
        self.assertEqual(model.get_layer("conv3_block1_0_conv").strides, (2, 2))
        self.assertFalse(model.get_layer("conv3_block1_2_conv").use_bias)

    def test_torchvision_state_dict_names_and_layouts(self):
        model, _ = backbones.build("resnet50", (64, 64, 3), num_classes=7)
        state = backbones.torchvision_state_dict(model)
        # torchvision's ResNet-50 state dict: 320 entries, less 53 num_batches_tracked.
        self.assertLen(state, 320 - 53)
        self.assertEqual(state["conv1.weight"].shape, (64, 3, 7, 7))
        self.assertEqual(state["layer2.0.conv2.weight"].shape, (128, 128, 3, 3))
        self.assertEqual(state["layer2.0.downsample.0.weight"].shape, (512, 256, 1, 1))
        self.assertEqual(state["layer4.2.bn3.running_var"].shape, (2048,))
        self.assertEqual(state["fc.weight"].shape, (7, 2048))
        kernel = model.get_layer("conv2_block1_2_conv").kernel.numpy()
        self.assertAllEqual(state["layer1.0.conv2.weight"][5, 3], kernel[:, :, 3, 5])
        with self.assertRaisesRegex(ValueError, "path='imagenet_normalization/mean'"):
            backbones.torchvision_name("imagenet_normalization/mean")

    def test_small_resnet_keeps_the_keras_layout(self):
        model = backbones.small_resnet((32, 32, 3), num_classes=10)
        self.assertEqual(model.get_layer("conv3_block1_1_conv").padding, "same")
        self.assertAllEqual(model.get_layer("conv3_block1_2_bn").gamma, np.zeros(32))

    def test_local_weights_with_new_head(self):
        source, _ = backbones.build("small_resnet", (32, 32, 3), num_classes=10)
        path = os.path.join(tempfile.mkdtemp(), "source.weights.h5")
        source.save_weights(path)
        target = backbones.small_resnet((32, 32, 3), num_classes=4, weights=path)
        self.assertAllClose(
            target.get_layer("conv2_block1_1_conv").kernel,
            source.get_layer("conv2_block1_1_conv").kernel,
        )
        self.assertEqual(target.output.shape[-1], 4)

    def test_small_resnet_standardises_each_image(self):
        # Per-image normalisation: every channel of every image has zero mean and
        # unit variance after the first layer, so scaling (a > 0) and shifting
        # an image's channels changes nothing (up to the epsilon in the variance).
        model = backbones.small_resnet((32, 32, 3), num_classes=10)
        first = keras.Model(model.input, model.get_layer("per_image_normalization").output)
        rng = np.random.default_rng(0)
        images = rng.uniform(0.0, 1.0, (2, 32, 32, 3)).astype(np.float32)
        recoloured = images * np.array([2.0, 3.0, 1.5], np.float32) + np.array(
            [0.3, -0.2, 0.1], np.float32
        )
        normalised = first(images)
        self.assertAllClose(tf.reduce_mean(normalised, axis=(1, 2)), tf.zeros((2, 3)), atol=1e-5)
        self.assertAllClose(tf.math.reduce_std(normalised, axis=(1, 2)), tf.ones((2, 3)), atol=1e-2)
        self.assertAllClose(first(recoloured), normalised, atol=1e-2)
        self.assertAllClose(model(recoloured), model(images), atol=1e-2, rtol=1e-2)
        # The ImageNet normalisation of the big backbones keeps the colours.
        big, _ = backbones.build("resnet18", (32, 32, 3), num_classes=10)
        self.assertNotAllClose(big(recoloured), big(images), atol=1e-2)

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "input_normalization='zca'"):
            backbones.basic_resnet((32, 32, 3), 2, (1,), (8,), input_normalization="zca")
        with self.assertRaisesRegex(ValueError, "layout='caffe'"):
            backbones.basic_resnet((32, 32, 3), 2, (1,), (8,), layout="caffe")
        with self.assertRaisesRegex(ValueError, "arch='vgg'"):
            backbones.build("vgg", (32, 32, 3), 2)
        with self.assertRaisesRegex(ValueError, "weights='imagenet'"):
            backbones.small_resnet(weights="imagenet")


def _batch_norm_pair(seed, **arguments):
    """Keras' and backbones' (fused) BatchNormalization with the same random weights."""
    rng = np.random.default_rng(seed)
    layers = (
        keras.layers.BatchNormalization(**arguments),
        # fused=True: the kernel also for float32 (by default only for half precision).
        backbones.BatchNormalization(fused=True, **arguments),
    )
    for layer in layers:
        layer.build((None, 5, 6, 8))
    for keras_variable, fused_variable in zip(*(layer.weights for layer in layers)):
        value = rng.normal(size=keras_variable.shape).astype(np.float32)
        if "variance" in keras_variable.path:
            value = np.abs(value) + 0.5
        keras_variable.assign(value)
        fused_variable.assign(value)
    return layers


def _batch_norm_step(layer, images, training, jit_compile):
    """(outputs, gradients wrt [images, gamma, beta]) of a cubic loss; updates moving stats."""
    weights = tf.range(1.0, images.shape[-1] + 1.0)

    @tf.function(jit_compile=jit_compile)
    def step(images):
        with tf.GradientTape() as tape:
            tape.watch(images)
            outputs = layer(images, training=training)
            # Cubic and channel-weighted, so the gradient is not a constant per channel.
            loss = tf.reduce_sum(tf.cast(outputs, tf.float32) ** 3 * weights)
        return outputs, tape.gradient(loss, [images] + layer.trainable_weights)

    return step(tf.constant(images))


class FusedBatchNormalizationTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(
        # (training, jit_compile, affine: center and scale)
        (True, False, True),
        (False, False, True),
        (True, True, True),
        (False, True, True),
        (True, False, False),
    )
    def test_equals_keras_batch_normalization_in_float32(self, training, jit_compile, affine):
        arguments = {"momentum": 0.9, "epsilon": 1e-5, "center": affine, "scale": affine}
        keras_layer, fused_layer = _batch_norm_pair(0, **arguments)
        images = np.random.default_rng(1).normal(1.0, 2.0, (3, 5, 6, 8)).astype(np.float32)
        for _ in range(2):  # the second step starts from the updated moving statistics
            expected, expected_gradients = _batch_norm_step(
                keras_layer, images, training, jit_compile
            )
            actual, gradients = _batch_norm_step(fused_layer, images, training, jit_compile)
            self.assertAllClose(actual, expected, atol=1e-5)
            self.assertLen(gradients, len(expected_gradients))
            for gradient, expected_gradient in zip(gradients, expected_gradients):
                self.assertAllClose(gradient, expected_gradient, rtol=1e-4, atol=1e-4)
            for variable, expected_variable in zip(fused_layer.weights, keras_layer.weights):
                self.assertEqual(variable.name, expected_variable.name)
                self.assertAllClose(variable, expected_variable, atol=1e-6, msg=variable.path)
        # The oracle of the moving statistics: momentum 0.9, the biased batch variance.
        if training:
            _, fresh = _batch_norm_pair(0, **arguments)
            initial_mean = fresh.moving_mean.numpy()
            initial_variance = fresh.moving_variance.numpy()
            mean = images.mean(axis=(0, 1, 2))
            variance = images.var(axis=(0, 1, 2))
            _batch_norm_step(fresh, images, training, jit_compile)
            self.assertAllClose(fresh.moving_mean, 0.9 * initial_mean + 0.1 * mean, atol=1e-5)
            self.assertAllClose(
                fresh.moving_variance, 0.9 * initial_variance + 0.1 * variance, atol=1e-5
            )

    def test_kernel_for_half_precision_by_default(self):
        def op_types(layer, dtype):
            function = tf.function(lambda x: layer(x, training=True))
            graph = function.get_concrete_function(tf.TensorSpec((2, 4, 4, 8), dtype)).graph
            return {op.type for op in graph.get_operations()}

        for fused, dtype, kernel in (
            (None, tf.bfloat16, True), (None, tf.float32, False),
            (True, tf.float32, True), (False, tf.bfloat16, False),
        ):
            policy = "mixed_bfloat16" if dtype == tf.bfloat16 else "float32"
            layer = backbones.BatchNormalization(fused=fused, dtype=policy)
            layer.build((None, 4, 4, 8))
            self.assertEqual("FusedBatchNormV3" in op_types(layer, dtype), kernel, (fused, dtype))
        with self.assertRaisesRegex(ValueError, "fused='yes' must be None, True or False"):
            backbones.BatchNormalization(fused="yes")

    def test_frozen_layer_uses_its_moving_statistics(self):
        keras_layer, fused_layer = _batch_norm_pair(2, momentum=0.9, epsilon=1e-5)
        keras_layer.trainable = fused_layer.trainable = False
        images = np.random.default_rng(3).normal(size=(2, 5, 6, 8)).astype(np.float32)
        before = [variable.numpy() for variable in fused_layer.weights]
        expected, _ = _batch_norm_step(keras_layer, images, True, False)
        actual, _ = _batch_norm_step(fused_layer, images, True, False)
        self.assertAllClose(actual, expected, atol=1e-5)
        for variable, value in zip(fused_layer.weights, before):
            self.assertAllEqual(variable, value)

    def test_bfloat16_input_keeps_its_dtype_and_float32_statistics(self):
        arguments = {"momentum": 0.9, "epsilon": 1e-5, "dtype": "mixed_bfloat16"}
        keras_layer, fused_layer = _batch_norm_pair(4, **arguments)
        images = np.random.default_rng(5).normal(1.0, 2.0, (3, 5, 6, 8)).astype(np.float32)
        for training in (True, False):
            expected, expected_gradients = _batch_norm_step(keras_layer, images, training, False)
            actual, gradients = _batch_norm_step(fused_layer, images, training, False)
            self.assertEqual(actual.dtype, tf.bfloat16)
            # Both normalise the same bfloat16 input in float32; the outputs differ
            # by the rounding of the result to bfloat16 (8 bits of mantissa).
            self.assertAllClose(
                tf.cast(actual, tf.float32), tf.cast(expected, tf.float32), rtol=2e-2, atol=2e-2
            )
            for gradient, expected_gradient in zip(gradients, expected_gradients):
                self.assertAllClose(
                    tf.cast(gradient, tf.float32), tf.cast(expected_gradient, tf.float32),
                    rtol=5e-2, atol=5e-1,
                )
        self.assertEqual(fused_layer.moving_variance.dtype, "float32")
        self.assertAllClose(fused_layer.moving_mean, keras_layer.moving_mean, atol=1e-2)
        self.assertAllClose(fused_layer.moving_variance, keras_layer.moving_variance, rtol=1e-2)

    def test_unfusable_inputs_run_keras_code(self):
        # Rank 2, a mask, synchronized: Keras' own path, with the same results.
        keras_layer = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
        fused_layer = backbones.BatchNormalization(momentum=0.9, epsilon=1e-5)
        features = np.random.default_rng(6).normal(size=(4, 8)).astype(np.float32)
        mask = np.array([True, True, False, True])
        for layer in (keras_layer, fused_layer):
            layer.build(features.shape)
        self.assertAllClose(
            fused_layer(features, training=True), keras_layer(features, training=True)
        )
        self.assertAllClose(
            fused_layer(features, training=True, mask=mask),
            keras_layer(features, training=True, mask=mask),
        )
        fused_layer.synchronized = keras_layer.synchronized = True
        self.assertAllClose(
            fused_layer(features, training=True), keras_layer(features, training=True)
        )
        self.assertAllClose(fused_layer.moving_variance, keras_layer.moving_variance)

    # The keras and the torchvision layout (resnet34/50 build the torchvision one's layers).
    @parameterized.parameters("small_resnet", "resnet18")
    def test_backbones_use_it_and_load_keras_batch_norm_weights(self, arch):
        model, _ = backbones.build(arch, (32, 32, 3), num_classes=3)
        norms = [layer for layer in model.layers if "_bn" in layer.name]
        self.assertNotEmpty(norms)
        for layer in norms:
            self.assertIsInstance(layer, backbones.BatchNormalization)

        def plain_batch_norm(layer):
            if isinstance(layer, backbones.BatchNormalization):
                config = layer.get_config()
                del config["fused"]
                return keras.layers.BatchNormalization.from_config(config)
            return layer.__class__.from_config(layer.get_config())

        # The same network with Keras' own BatchNormalization (what models saved
        # before the fused layer hold) and random weights and statistics.
        unfused = keras.models.clone_model(model, clone_function=plain_batch_norm)
        rng = np.random.default_rng(7)
        for variable in unfused.weights:
            value = rng.normal(0.0, 0.1, variable.shape)
            if "variance" in variable.path:
                value = np.abs(value) + 0.5
            variable.assign(value.astype(np.float32))
        path = os.path.join(tempfile.mkdtemp(), "unfused.weights.h5")
        unfused.save_weights(path)
        model.load_weights(path)
        images = rng.uniform(0.0, 1.0, (2, 32, 32, 3)).astype(np.float32)
        self.assertAllClose(model(images), unfused(images), rtol=1e-4, atol=1e-4)
        # ... and the fused layer round-trips through a .keras file.
        saved = os.path.join(tempfile.mkdtemp(), "model.keras")
        model.save(saved)
        loaded = keras.models.load_model(saved)
        self.assertIsInstance(loaded.get_layer(norms[0].name), backbones.BatchNormalization)
        self.assertAllClose(loaded(images), model(images))

    def test_synchronized_batch_norm_option_reaches_the_fused_layers(self):
        model, _ = backbones.build("small_resnet", (32, 32, 3), 3, synchronized_batch_norm=True)
        norms = [l for l in model.layers if isinstance(l, backbones.BatchNormalization)]
        self.assertNotEmpty(norms)
        self.assertTrue(all(layer.synchronized for layer in norms))

    def test_inference_batch_norm_folds_into_the_convolutions(self):
        # Grad-CAM at inference folds each conv -> BN pair (gradcam.inference_call).
        model, _ = backbones.build("resnet18", (32, 32, 3), num_classes=3)
        self.assertLen(gradcam._foldable_pairs(model), 20)
        images = np.random.default_rng(8).uniform(0.0, 1.0, (2, 32, 32, 3)).astype(np.float32)
        self.assertAllClose(
            gradcam.inference_call(model, images), model(images, training=False),
            rtol=1e-4, atol=1e-4,
        )


if __name__ == "__main__":
    tf.test.main()
