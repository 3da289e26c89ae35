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

    def test_last_target_candidate_is_last_4d(self):
        self.assertEqual(gradcam.target_candidates(self.model)[-1], "features")

    def test_other_heads_have_no_closed_form(self):
        model = testing_models.tiny_convnet_flatten_head()
        self.assertIsNone(gradcam.pooling_dense_head(model, "features"))
        extractor = gradcam.feature_model(model, "features")
        _, cam, _ = gradcam.gradcam(extractor, self.images)
        self.assertEqual(cam.shape, (4, 8, 8))


if __name__ == "__main__":
    tf.test.main()


def _batch_norm_convnet():
    """Conv(bias) -> BN, depthwise(x2) -> BN, a conv also skipping its BN, pooling + dense."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="conv_bn")(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(
        3, strides=2, depth_multiplier=2, use_bias=False, padding="same", name="depthwise"
    )(x)
    x = keras.layers.BatchNormalization(name="depthwise_bn")(x)
    shared = keras.layers.Conv2D(8, 1, use_bias=False, name="shared")(x)
    y = keras.layers.BatchNormalization(name="shared_bn")(shared)
    x = keras.layers.Add(name="features")([y, shared])
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.gamma.shape
            layer.moving_mean.assign(rng.normal(size=channels).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.2, 2.0, size=channels).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, size=channels).astype("float32"))
            layer.beta.assign(rng.normal(size=channels).astype("float32"))
    return model


class InferenceCallTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.model = _batch_norm_convnet()
        self.images = tf.random.stateless_uniform([4, 16, 16, 3], seed=[5, 6])

    def test_folds_conv_batch_norm_pairs_and_equals_the_model(self):
        extractor = gradcam.feature_model(self.model, "features")
        pairs = gradcam._foldable_pairs(extractor)
        # "shared" feeds its BN and the Add: not folded.
        self.assertEqual(
            sorted(batch_norm.name for batch_norm in pairs.values()), ["conv_bn", "depthwise_bn"]
        )
        expected = extractor(self.images, training=False)
        folded = tf.function(lambda x: gradcam.inference_call(extractor, x))(self.images)
        for want, got in zip(expected, folded):
            self.assertAllClose(got, want, atol=1e-5, rtol=1e-5)

    def test_target_convolution_before_batch_norm_is_not_folded(self):
        extractor = gradcam.feature_model(self.model, "depthwise")
        self.assertEqual(
            [batch_norm.name for batch_norm in gradcam._foldable_pairs(extractor).values()],
            ["conv_bn"],
        )
        features, _ = gradcam.inference_call(extractor, self.images)
        self.assertAllClose(features, extractor(self.images, training=False)[0], atol=1e-5)

    def test_heatmaps_equal_a_gradient_tape_oracle_on_the_unfolded_model(self):
        extractor = gradcam.feature_model(self.model, "features")
        with tf.GradientTape() as tape:
            features, logits = extractor(self.images, training=False)
            classes = tf.argmax(logits, axis=-1, output_type=tf.int32)
            score = tf.reduce_sum(tf.gather(logits, classes, axis=1, batch_dims=1))
        gradients = tape.gradient(score, features)
        weights = tf.reduce_mean(gradients, axis=[1, 2], keepdims=True)
        oracle = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
        _, cam, used = gradcam.gradcam(extractor, self.images, method="gradcam")
        self.assertAllEqual(used, classes)
        self.assertAllClose(cam, oracle, atol=1e-5, rtol=1e-4)
        self.assertGreater(float(tf.reduce_max(oracle)), 0.0)
