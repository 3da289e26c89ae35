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


if __name__ == "__main__":
    tf.test.main()
