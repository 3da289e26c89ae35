"""Tests of cgc_tf/serving.py in eager mode: the serving computations against the model itself."""

import io

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

import cgc_tf
from cgc_tf import gradcam
from cgc_tf import serving
from cgc_tf.data import views
from tests import testing_models


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class ServingTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.model = cgc_tf.CGCModel(testing_models.tiny_convnet(), target_layer="features")
        self.functions = serving.ServingFunctions(self.model)
        rng = np.random.default_rng(0)
        self.images = rng.uniform(0.0, 1.0, (3, 16, 16, 3)).astype(np.float32)
        self.pixels = rng.integers(0, 256, (3, 24, 20, 3), dtype=np.uint8)

    def test_specs(self):
        self.assertEqual(serving.float_spec().shape.as_list(), [None, None, None, None])
        self.assertEqual(serving.float_spec(2, 3).shape.as_list(), [2, None, None, 3])
        self.assertEqual(serving.float_spec().name, serving.IMAGES_KEY)
        self.assertEqual(serving.bytes_spec().dtype, tf.string)
        self.assertEqual(serving.class_index_spec(4).shape.as_list(), [4])
        self.assertEqual(serving.class_index_spec().dtype, tf.int32)
        self.assertEqual(
            set(self.functions.signatures()),
            {"serving_default", "explain", "explain_class", "serving_bytes", "explain_bytes",
             "explain_bytes_class"},
        )

    def test_sanitize(self):
        images = tf.constant([np.nan, -np.inf, np.inf, -0.5, 0.25, 1.5])
        self.assertAllEqual(serving.sanitize(images), [0.0, 0.0, 1.0, 0.0, 0.25, 1.0])

    def test_preprocess_encoded_is_the_deterministic_view(self):
        # PNG is lossless: decoding gives the pixels back, then the evaluation view.
        for pixels in self.pixels:
            served = serving.preprocess_encoded(tf.constant(_png(pixels)), 16)
            self.assertAllClose(served, views.deterministic_view(pixels, 16), atol=1e-6)

    def test_explain_equals_the_closed_form_of_the_model(self):
        self.assertTrue(self.functions.closed_form)
        outputs = self.functions.explain(tf.constant(self.images))
        features, logits = self.model.extractor(self.images, training=False)
        dense = self.model.backbone.get_layer("logits")
        predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
        cam = gradcam.closed_form_cam(features, dense.kernel, predicted)
        self.assertAllClose(outputs["probabilities"], tf.nn.softmax(logits), atol=1e-6)
        self.assertAllEqual(outputs["class_id"], predicted)
        self.assertAllClose(outputs["heatmap"], gradcam.upsample(cam, (16, 16)), atol=1e-5)
        # -1 asks for the prediction; other entries pick the class.
        chosen = self.functions.explain_class(tf.constant(self.images), tf.constant([-1, 2, 0]))
        target = tf.constant([int(predicted[0]), 2, 0])
        cam = gradcam.closed_form_cam(features, dense.kernel, target)
        self.assertAllClose(chosen["heatmap"], gradcam.upsample(cam, (16, 16)), atol=1e-5)

    def test_bytes_skip_undecodable_elements(self):
        encoded = tf.constant([_png(self.pixels[0]), b"not an image", _png(self.pixels[1])])
        outputs = self.functions.explain_bytes(encoded)
        self.assertAllEqual(outputs["valid"], [True, False, True])
        self.assertEqual(int(outputs["class_id"][1]), -1)
        self.assertAllEqual(outputs["probabilities"][1], tf.zeros([3]))
        self.assertAllEqual(outputs["heatmap"][1], tf.zeros([16, 16]))
        # The decodable ones equal the float path on their evaluation views.
        viewed = tf.stack([views.deterministic_view(p, 16) for p in self.pixels[:2]])
        expected = self.functions.explain(viewed)
        for key in ("probabilities", "heatmap"):
            self.assertAllClose(tf.gather(outputs[key], [0, 2]), expected[key], atol=1e-5)
        self.assertAllEqual(tf.gather(outputs["class_id"], [0, 2]), expected["class_id"])

    def test_nothing_decodable_gives_an_all_invalid_batch(self):
        outputs = self.functions.predict_bytes(tf.constant([b"", b"junk"]))
        self.assertAllEqual(outputs["valid"], [False, False])
        self.assertAllEqual(outputs["class_id"], [-1, -1])

    def test_non_square_models_are_refused(self):
        image = keras.Input((16, 12, 3))
        x = keras.layers.Conv2D(4, 3, name="features", activation="relu")(image)
        x = keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(x))
        model = cgc_tf.CGCModel(keras.Model(image, x), target_layer="features")
        with self.assertRaisesRegex(ValueError, r"16x12 images; export needs square"):
            serving.ServingFunctions(model)


if __name__ == "__main__":
    tf.test.main()
