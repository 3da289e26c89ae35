"""Backbones: offline builds, recommended target layers, local weights."""

import os
import tempfile

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

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "arch='vgg'"):
            backbones.build("vgg", (32, 32, 3), 2)
        with self.assertRaisesRegex(ValueError, "weights='imagenet'"):
            backbones.small_resnet(weights="imagenet")


if __name__ == "__main__":
    tf.test.main()
