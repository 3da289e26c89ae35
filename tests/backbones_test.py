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

    def test_parameter_counts(self):
        model, _ = backbones.build("resnet18", (224, 224, 3), num_classes=1000)
        # torchvision's ResNet-18 has 11,689,512 parameters; Keras counts BN
        # moving statistics too (9,600 of them).
        self.assertEqual(model.count_params(), 11_689_512 + 9_600)

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
        with self.assertRaisesRegex(ValueError, "arch='vgg'"):
            backbones.build("vgg", (32, 32, 3), 2)
        with self.assertRaisesRegex(ValueError, "weights='imagenet'"):
            backbones.small_resnet(weights="imagenet")


if __name__ == "__main__":
    tf.test.main()
