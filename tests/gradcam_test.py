"""Grad-CAM: closed-form oracle, second-order gradients, layer validation."""

import numpy as np
import tensorflow as tf

from cgc_tf import gradcam
from tests import testing_models


class GradcamTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.model = testing_models.tiny_convnet()
        self.images = tf.random.stateless_uniform([4, 16, 16, 3], seed=[1, 2])

    def test_equals_closed_form_for_pooling_dense_head(self):
        extractor = gradcam.feature_model(self.model, "features")
        logits, cam, class_index = gradcam.gradcam(extractor, self.images)
        features, _ = extractor(self.images)
        dense = gradcam.pooling_dense_head(self.model, "features")
        self.assertIs(dense, self.model.get_layer("logits"))
        expected = gradcam.closed_form_cam(features, dense.kernel, class_index)
        self.assertAllClose(cam, expected, atol=1e-5, rtol=1e-5)
        self.assertAllEqual(class_index, tf.argmax(logits, axis=-1, output_type=tf.int32))
        self.assertGreater(float(tf.reduce_max(cam)), 0.0)

    def test_given_class_index(self):
        extractor = gradcam.feature_model(self.model, "features")
        classes = tf.constant([2, 0, 1, 2])
        _, cam, used = gradcam.gradcam(extractor, self.images, class_index=classes)
        features, _ = extractor(self.images)
        dense = self.model.get_layer("logits")
        self.assertAllEqual(used, classes)
        self.assertAllClose(cam, gradcam.closed_form_cam(features, dense.kernel, classes), atol=1e-5)

    def test_second_order_gradients_reach_conv_weights(self):
        extractor = gradcam.feature_model(self.model, "features")
        conv = self.model.get_layer("conv1").kernel
        with tf.GradientTape() as tape:
            _, cam, _ = gradcam.gradcam(extractor, self.images, training=True)
            heatmaps = gradcam.sum_normalize(gradcam.upsample(cam, (16, 16)))
            loss = tf.reduce_sum(heatmaps[:, :8, :8])
        gradients = tape.gradient(loss, [conv, self.model.get_layer("logits").kernel])
        for gradient in gradients:
            self.assertIsNotNone(gradient)
            self.assertGreater(float(tf.reduce_max(tf.abs(gradient))), 0.0)

    def test_works_in_compiled_function(self):
        extractor = gradcam.feature_model(self.model, "features")

        @tf.function(jit_compile=True)
        def compiled(images):
            return gradcam.gradcam(extractor, images)[1]

        eager = gradcam.gradcam(extractor, self.images)[1]
        self.assertAllClose(compiled(self.images), eager, atol=1e-5)

    def test_upsample_and_normalize(self):
        cam = tf.constant(np.arange(8, dtype=np.float32).reshape(2, 2, 2))
        up = gradcam.upsample(cam, (4, 4))
        self.assertEqual(up.shape, (2, 4, 4))
        normalized = gradcam.sum_normalize(up)
        self.assertAllClose(
            tf.reduce_sum(normalized, axis=[1, 2]), [1.0 + 16e-8, 1.0 + 16e-8], atol=1e-6
        )
        zeros = gradcam.sum_normalize(tf.zeros([1, 4, 4]))
        self.assertTrue(np.all(np.isfinite(zeros.numpy())))

    def test_unknown_layer_lists_candidates(self):
        with self.assertRaisesRegex(ValueError, r"target_layer='nope'.*features"):
            gradcam.feature_model(self.model, "nope")

    def test_non_4d_layer_rejected(self):
        with self.assertRaisesRegex(ValueError, r"target_layer='pool'"):
            gradcam.feature_model(self.model, "pool")

    def test_default_target_layer_is_last_4d(self):
        self.assertEqual(gradcam.default_target_layer(self.model), "features")

    def test_other_heads_have_no_closed_form(self):
        model = testing_models.tiny_convnet_flatten_head()
        self.assertIsNone(gradcam.pooling_dense_head(model, "features"))
        extractor = gradcam.feature_model(model, "features")
        _, cam, _ = gradcam.gradcam(extractor, self.images)
        self.assertEqual(cam.shape, (4, 8, 8))


if __name__ == "__main__":
    tf.test.main()
