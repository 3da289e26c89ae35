"""cgc_tf.explain on any Keras classifier: GradientTape and hand-computed oracles.

The oracles never call cgc_tf: `tape_gradcam` is Selvaraju et al.'s Grad-CAM one
example at a time with a plain GradientTape on a logits twin of the model (same
weights, no softmax), and the Flatten -> Dense head has a known gradient
dz_c/dF = W[:, c], which gives hand computations of Grad-CAM and Grad-CAM++.
"""

import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

import cgc_tf
from cgc_tf import explainers
from cgc_tf import gradcam
from tests import testing_models


def tape_gradcam(logits_model, layer_name, images, class_index, extra_tokens=None):
    """Grad-CAM [B, H, W] by a per-example tf.GradientTape (float32 or float64 models)."""
    layer = logits_model.get_layer(layer_name)
    sub = keras.Model(logits_model.inputs, [layer.output, logits_model.outputs[0]])
    maps = []
    for i in range(images.shape[0]):
        with tf.GradientTape() as tape:
            features, logits = sub(images[i : i + 1])
            score = logits[0, int(class_index[i])]
        gradients = tape.gradient(score, features)
        if extra_tokens is not None:
            side = int(round((features.shape[1] - extra_tokens) ** 0.5))
            features = tf.reshape(features[:, extra_tokens:], [1, side, side, -1])
            gradients = tf.reshape(gradients[:, extra_tokens:], [1, side, side, -1])
        weights = tf.reduce_mean(gradients, axis=[1, 2], keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
        maps.append(tf.image.resize(tf.cast(cam, tf.float32)[..., None], images.shape[1:3])[0, ..., 0])
    return tf.stack(maps)


def twin_with_logits(build, model):
    """`build(activation)` again with no softmax, carrying `model`'s weights."""
    twin = build(None)
    twin.set_weights(model.get_weights())
    return twin


def sequential_cnn(activation="softmax", flatten=True, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv1"),
            keras.layers.Conv2D(5, 3, strides=2, padding="same", activation="relu", name="conv2"),
            keras.layers.Flatten(name="flatten") if flatten else keras.layers.GlobalAveragePooling2D(name="pool"),
            keras.layers.Dropout(0.5, name="dropout"),
            keras.layers.Dense(4, activation=activation, name="predictions"),
        ],
        name="sequential_cnn",
    )


class ClassToken(keras.layers.Layer):
    def build(self, input_shape):
        self.token = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="random_normal")

    def call(self, tokens):
        batch = keras.ops.shape(tokens)[0]
        return keras.ops.concatenate([keras.ops.tile(self.token, [batch, 1, 1]), tokens], axis=1)


class PositionEmbedding(keras.layers.Layer):
    def build(self, input_shape):
        self.position = self.add_weight(shape=(1,) + tuple(input_shape[1:]), initializer="random_normal")

    def call(self, tokens):
        return tokens + self.position


class TakeClassToken(keras.layers.Layer):
    def call(self, tokens):
        return tokens[:, 0]


def tiny_vit(activation=None, image_size=32, patch=8, dim=16, num_classes=3, seed=0):
    """Patch embedding, a class token, two pre-norm transformer blocks, the class token's logits."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(dim, patch, strides=patch, name="patches")(inputs)
    x = keras.layers.Reshape(((image_size // patch) ** 2, dim))(x)
    x = PositionEmbedding()(ClassToken()(x))
    for block in range(2):
        h = keras.layers.LayerNormalization(name=f"block{block}_norm1")(x)
        h = keras.layers.MultiHeadAttention(2, 8, name=f"block{block}_attention")(h, h)
        x = keras.layers.Add()([x, h])
        h = keras.layers.LayerNormalization(name=f"block{block}_norm2")(x)
        h = keras.layers.Dense(2 * dim, activation="gelu")(h)
        x = keras.layers.Add()([x, keras.layers.Dense(dim)(h)])
    x = TakeClassToken()(keras.layers.LayerNormalization(name="final_norm")(x))
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation=activation)(x), name="vit")


APPLICATIONS = [
    # (name, input size, slow)
    ("MobileNetV3Small", 64, False),
    ("MobileNetV2", 64, False),
    ("ResNet50", 64, True),
    ("ResNet50V2", 64, True),
    ("EfficientNetB0", 64, True),
    ("EfficientNetV2B0", 64, True),
    ("ConvNeXtTiny", 64, True),
    ("DenseNet121", 64, True),
]


def _normalized(heatmaps):
    heatmaps = np.asarray(heatmaps, np.float64)
    return heatmaps / np.maximum(heatmaps.max(axis=(1, 2), keepdims=True), 1e-30)


class ExplainTest(tf.test.TestCase, parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.images = tf.random.stateless_uniform([3, 16, 16, 3], seed=[3, 4])

    def test_softmax_sequential_equals_tape_oracle_on_logits(self):
        model = sequential_cnn("softmax")
        logits_model = twin_with_logits(sequential_cnn, model)
        self.assertEqual(explainers.auto_target_layer(model), "conv2")
        predicted = np.argmax(logits_model(self.images).numpy(), axis=-1)
        heatmaps = cgc_tf.explain(model, self.images)
        self.assertEqual(heatmaps.dtype, tf.float32)
        self.assertEqual(heatmaps.shape, (3, 16, 16))
        expected = tape_gradcam(logits_model, "conv2", self.images, predicted)
        self.assertGreater(float(tf.reduce_max(expected)), 0.0)
        self.assertAllClose(heatmaps, expected, atol=1e-6, rtol=1e-5)

    def test_class_index_int_and_per_example(self):
        model = sequential_cnn(None)
        for class_index in (2, tf.constant([0, 3, 1])):
            expected_classes = np.broadcast_to(np.asarray(class_index), (3,))
            expected = tape_gradcam(model, "conv2", self.images, expected_classes)
            heatmaps = cgc_tf.explain(model, self.images, class_index=class_index)
            self.assertAllClose(heatmaps, expected, atol=1e-6, rtol=1e-5)

    def test_flatten_head_by_hand(self):
        # logits = flatten(F) @ W + b, so dz_c/dF = W[:, c] reshaped to [h, w, k].
        model = sequential_cnn(None)
        features = keras.Model(model.inputs, model.get_layer("conv2").output)(self.images).numpy()
        features = features.astype(np.float64)
        kernel = model.get_layer("predictions").kernel.numpy().astype(np.float64)
        logits = model(self.images).numpy().astype(np.float64)
        classes = np.array([1, 3, 0])
        gradients = np.stack([kernel[:, c].reshape(features.shape[1:]) for c in classes])
        gradcam_expected = np.maximum(
            np.sum(gradients.mean(axis=(1, 2), keepdims=True) * features, axis=-1), 0.0
        )
        # Grad-CAM++ (Chattopadhay et al. 2018, eq. 19), with the exponential score
        # Y = exp(z_c) kept: dY/dF = exp(z_c) g, d2Y = exp(z_c) g^2, d3Y = exp(z_c) g^3.
        scale = np.exp(logits[np.arange(3), classes])[:, None, None, None]
        first, second, third = scale * gradients, scale * gradients**2, scale * gradients**3
        total = features.sum(axis=(1, 2), keepdims=True)
        denominator = 2 * second + total * third
        alpha = np.where(denominator != 0, second / np.where(denominator != 0, denominator, 1), 0)
        weights = np.sum(alpha * np.maximum(first, 0), axis=(1, 2), keepdims=True)
        plus_expected = np.maximum(np.sum(weights * features, axis=-1), 0.0) / scale[..., 0]
        extractor = gradcam.feature_model(model, "conv2")
        for method, expected in (("gradcam", gradcam_expected), ("gradcam++", plus_expected)):
            _, cam, _ = gradcam.gradcam(extractor, self.images, classes, method=method)
            self.assertGreater(float(np.max(expected)), 0.0)
            self.assertAllClose(cam, expected, atol=1e-6, rtol=1e-4, msg=method)
            upsampled = cgc_tf.explain(model, self.images, classes, "conv2", method)
            self.assertAllClose(upsampled, gradcam.upsample(tf.constant(expected, tf.float32), (16, 16)), atol=1e-6, rtol=1e-4)

    def test_closed_form_equals_gradcam_on_pooling_dense_head(self):
        model = sequential_cnn("softmax", flatten=False)
        dense = gradcam.pooling_dense_head(model, "conv2")
        self.assertIs(dense, model.get_layer("predictions"))
        gradcam_maps = cgc_tf.explain(model, self.images, method="gradcam")
        for method in ("closed_form", "gradient_x_activation"):
            maps = cgc_tf.explain(model, self.images, method=method)
            self.assertAllClose(maps, gradcam_maps, atol=1e-6, rtol=1e-5, msg=method)
        # Grad-CAM++ by hand: the gradient is g_k = W[k, c] / (h w) at every position,
        # so alpha_k = 1 / (2 + S_k g_k) with S_k = sum_ab F_abk, and the weight
        # of channel k is h w alpha_k ReLU(g_k).
        features = keras.Model(model.inputs, model.get_layer("conv2").output)(self.images).numpy()
        features = features.astype(np.float64)
        kernel = dense.kernel.numpy().astype(np.float64)
        classes = np.argmax(model(self.images).numpy(), axis=-1)
        area = features.shape[1] * features.shape[2]
        g = kernel[:, classes].T / area  # [B, k]
        total = features.sum(axis=(1, 2))
        weights = area * np.maximum(g, 0) / (2 + total * g)
        expected = np.maximum(np.einsum("bhwk,bk->bhw", features, weights), 0)
        _, cam, _ = gradcam.gradcam(gradcam.feature_model(model, "conv2"), self.images, method="gradcam++")
        self.assertGreater(float(np.max(expected)), 0.0)
        self.assertAllClose(cam, expected, atol=1e-6, rtol=1e-4)

    def test_closed_form_needs_a_pooling_dense_head(self):
        with self.assertRaisesRegex(ValueError, "closed_form.*'conv2'"):
            cgc_tf.explain(sequential_cnn(), self.images, method="closed_form")

    def test_unknown_method_and_layer(self):
        model = sequential_cnn()
        with self.assertRaisesRegex(ValueError, "method='cam'"):
            cgc_tf.explain(model, self.images, method="cam")
        with self.assertRaisesRegex(ValueError, r"target_layer='flatten'.*conv1', 'conv2'"):
            cgc_tf.explain(model, self.images, target_layer="flatten")

    def test_no_candidate_lists_the_layers(self):
        inputs = keras.Input((16, 16, 3))
        x = keras.layers.Conv2D(4, 16, name="global_conv")(inputs)  # 1x1 output
        logits = keras.layers.Dense(3)(keras.layers.Flatten()(x))
        model = keras.Model(inputs, logits, name="one_by_one")
        with self.assertRaisesRegex(ValueError, r"'one_by_one' has no layer.*global_conv"):
            cgc_tf.explain(model, self.images)

    def test_tf_function_and_xla_equal_eager(self):
        model = sequential_cnn("softmax")
        eager = cgc_tf.explain(model, self.images, method="gradcam++")
        for jit_compile in (False, True):
            compiled = tf.function(
                lambda x: cgc_tf.explain(model, x, method="gradcam++"), jit_compile=jit_compile
            )
            self.assertAllClose(compiled(self.images), eager, atol=1e-6, rtol=1e-5)

    def test_mixed_bfloat16_gives_float32_heatmaps(self):
        reference = sequential_cnn(None)
        expected = cgc_tf.explain(reference, self.images)
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            model = sequential_cnn(None)
            model.set_weights(reference.get_weights())
            heatmaps = cgc_tf.explain(model, self.images)
            compiled = tf.function(lambda x: cgc_tf.explain(model, x), jit_compile=True)(self.images)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        self.assertEqual(heatmaps.dtype, tf.float32)
        self.assertEqual(compiled.dtype, tf.float32)
        scale = float(tf.reduce_max(expected))
        self.assertAllClose(heatmaps / scale, expected / scale, atol=0.05)

    def test_cgc_model_explain_uses_the_same_code(self):
        backbone = testing_models.tiny_convnet()
        model = cgc_tf.CGCModel(backbone, target_layer="features")
        images = self.images
        for method in ("gradcam", "gradcam++", "closed_form"):
            ours = model.explain(images, method=method)["heatmap"]
            self.assertAllClose(ours, cgc_tf.explain(backbone, images, method=method), atol=1e-6)

    def test_cgc_model_trains_any_classifier_on_its_logits(self):
        self._trains_on_its_logits(sequential_cnn("softmax", flatten=False))

    @pytest.mark.slow  # the second-order step through MobileNetV3: ~25 s of CPU
    def test_cgc_model_trains_mobilenet_v3_on_its_logits(self):
        self._trains_on_its_logits(
            keras.applications.MobileNetV3Small(
                weights=None, input_shape=(32, 32, 3), classes=3, include_preprocessing=False
            )
        )

    def _trains_on_its_logits(self, backbone):
        """One CGC step on the logits of `backbone` (ends in a softmax); get_config."""
        model = cgc_tf.CGCModel(backbone)
        images = tf.image.resize(self.images, backbone.inputs[0].shape[1:3])
        # `backbone` is the logits model: softmax(model(x)) is the classifier's output.
        self.assertAllClose(tf.nn.softmax(model(images)), backbone(images), atol=1e-6)
        model.compile(optimizer="sgd")
        logs = model.train_on_batch(images, tf.constant([0, 1, 2]), return_dict=True)
        self.assertTrue(np.isfinite(logs["loss"]))
        self.assertTrue(np.isfinite(logs["cgc_loss"]))
        # The model round-trips through get_config with the original backbone.
        clone = cgc_tf.CGCModel.from_config(model.get_config())
        clone.set_weights(model.get_weights())
        self.assertAllClose(clone(images), model(images), atol=1e-6)
        self.assertEqual(clone.target_layer, model.target_layer)

    @pytest.mark.slow
    def test_export_of_a_softmax_sequential_classifier_uses_the_closed_form(self):
        from cgc_tf import export

        model = cgc_tf.CGCModel(sequential_cnn("softmax", flatten=False))
        with tempfile.TemporaryDirectory() as directory:
            # export_model verifies the SavedModel and ONNX outputs against the model.
            report = export.export_model(model, directory, formats=["saved_model", "onnx"])
        self.assertTrue(report["closed_form"])
        self.assertEqual(report["target_layer"], "conv2")

    def test_vit_tokens_on_the_patch_grid(self):
        model = tiny_vit("softmax")
        logits_model = twin_with_logits(tiny_vit, model)
        images = tf.random.stateless_uniform([2, 32, 32, 3], seed=[5, 6])
        # After the last attention only the class token reaches the logits: the
        # last layer whose patch tokens matter is the last block's first norm.
        self.assertEqual(explainers.auto_target_layer(model), "block1_norm1")
        classes = np.array([2, 0])
        heatmaps = cgc_tf.explain(model, images, class_index=classes)
        expected = tape_gradcam(logits_model, "block1_norm1", images, classes, extra_tokens=1)
        self.assertGreater(float(tf.reduce_max(expected)), 0.0)
        self.assertAllClose(heatmaps, expected, atol=1e-5, rtol=1e-4)
        # What the auto choice avoids: the final norm's patch tokens get no gradient.
        self.assertAllEqual(cgc_tf.explain(model, images, target_layer="final_norm"), tf.zeros_like(heatmaps))

    @parameterized.named_parameters(
        *[(name, name, size) for name, size, slow in APPLICATIONS if not slow]
    )
    def test_keras_applications(self, name, size):
        self._check_application(name, size)

    @parameterized.named_parameters(
        *[(name, name, size) for name, size, slow in APPLICATIONS if slow]
    )
    # Below the parameterization: the generated tests copy the function's marks
    # (a mark above named_parameters is lost and the tests ran in the fast lane).
    @pytest.mark.slow
    def test_keras_applications_slow(self, name, size):
        self._check_application(name, size)

    def _check_application(self, name, size):
        build = lambda activation: getattr(keras.applications, name)(  # noqa: E731
            weights=None, input_shape=(size, size, 3), classes=5, classifier_activation=activation
        )
        keras.utils.set_random_seed(0)
        model = build("softmax")
        logits_model = twin_with_logits(build, model)
        images = tf.random.stateless_uniform([2, size, size, 3], seed=[7, 8]) * 255.0
        layer = explainers.auto_target_layer(model)
        shape = model.get_layer(layer).output.shape
        # The last spatial map with more than one position (never MobileNetV3's 1x1 logits conv).
        self.assertEqual(len(shape), 4)
        self.assertGreater(shape[1] * shape[2], 1)
        self.assertEqual(layer, gradcam.target_candidates(model)[-1])
        # Explain the class whose oracle maps are largest, so the comparison is not 0 == 0.
        # The twin's unnamed layers got other automatic names: match by position.
        twin_layer = logits_model.layers[model.layers.index(model.get_layer(layer))].name
        oracle = {c: tape_gradcam(logits_model, twin_layer, images, [c, c]) for c in range(5)}
        best = max(oracle, key=lambda c: float(tf.reduce_min(tf.reduce_max(oracle[c], axis=[1, 2]))))
        self.assertGreater(float(tf.reduce_min(tf.reduce_max(oracle[best], axis=[1, 2]))), 0.0)
        heatmaps = cgc_tf.explain(model, images, class_index=best)
        self.assertAllClose(_normalized(heatmaps), _normalized(oracle[best]), atol=1e-4)


if __name__ == "__main__":
    tf.test.main()
