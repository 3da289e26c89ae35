"""CGCModel with jit_compile=True: the whole train step compiles with XLA and matches
the uncompiled step; augmentations without XLA kernels are rejected at compile()."""

import keras
import keras_cv
import numpy as np
import tensorflow as tf

import cgc_tf
from tests import testing_models

IMAGE_SIZE = 16
BATCH = 4


class FixedTransforms(cgc_tf.PairedAugmentation):
    """Returns transforms drawn once in advance, whatever the seed.

    XLA compiles TensorFlow's stateless random ops to a different generator, so
    the same seed gives different crops with and without jit_compile; comparing
    the two steps needs the same T on both sides.
    """

    def __init__(self, boxes, flips):
        super().__init__()
        self.fixed_boxes = np.asarray(boxes, np.float32)
        self.fixed_flips = np.asarray(flips, bool)

    def sample(self, batch_size, image_height, image_width):
        return {
            "boxes": tf.constant(self.fixed_boxes),
            "flips": tf.constant(self.fixed_flips),
            "layer_transformations": (),
        }


def _batch():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    classification_view = np.flip(images, axis=2).copy()
    labels = np.array([0, 1, 2, 1], np.int32)
    return {"image": images, "classification_view": classification_view}, labels


class XlaTest(tf.test.TestCase):
    def test_compiled_step_matches_uncompiled(self):
        # A random crop + flip per example, drawn once (eagerly, no XLA).
        transform = cgc_tf.PairedAugmentation(seed=3).sample(BATCH, IMAGE_SIZE, IMAGE_SIZE)
        self.assertFalse(np.allclose(transform["boxes"].numpy(), [0.0, 0.0, 1.0, 1.0]))
        features, labels = _batch()

        def one_step(jit_compile):
            model = cgc_tf.CGCModel(
                testing_models.tiny_convnet(IMAGE_SIZE),
                views=3,
                lambda_=1.0,
                global_negatives=True,
                augmentation=FixedTransforms(transform["boxes"], transform["flips"]),
            )
            model.compile(
                optimizer=keras.optimizers.SGD(0.5, momentum=0.9), jit_compile=jit_compile
            )
            self.assertEqual(model.jit_compile, jit_compile)
            history = model.fit(features, labels, batch_size=BATCH, epochs=2, verbose=0)
            return model.trainable_variables, history.history

        weights, history = one_step(jit_compile=False)
        compiled_weights, compiled_history = one_step(jit_compile=True)
        for key in ("loss", "ce_loss", "cgc_loss"):
            self.assertAllClose(compiled_history[key], history[key], atol=1e-4, msg=key)
        for compiled, expected in zip(compiled_weights, weights):
            self.assertAllClose(compiled, expected, atol=1e-4)

    def test_keras_cv_rotation_compiles(self):
        # keras-cv's rotation warps through augment's XLA path (projective matrices).
        augmentation = cgc_tf.PairedAugmentation(
            geometric_layers=[keras_cv.layers.RandomRotation(0.1, seed=1)], seed=1
        )
        self.assertTrue(augmentation.xla_compatible)
        model = cgc_tf.CGCModel(
            testing_models.tiny_convnet(IMAGE_SIZE), views=2, augmentation=augmentation
        )
        model.compile(optimizer="sgd", jit_compile=True)
        features, labels = _batch()
        history = model.fit(features["image"], labels, batch_size=BATCH, verbose=0)
        self.assertTrue(np.isfinite(history.history["loss"][0]))

    def test_augmentation_without_xla_path_is_rejected(self):
        # Keras's own RandomZoom warps with ImageProjectiveTransformV3 (no XLA kernel).
        augmentation = cgc_tf.PairedAugmentation(geometric_layers=[keras.layers.RandomZoom(0.1)])
        self.assertFalse(augmentation.xla_compatible)
        model = cgc_tf.CGCModel(
            testing_models.tiny_convnet(IMAGE_SIZE), views=2, augmentation=augmentation
        )
        with self.assertRaisesRegex(
            ValueError, r"jit_compile=True.*ImageProjectiveTransformV3.*jit_compile=False"
        ):
            model.compile(optimizer="sgd", jit_compile=True)
        model.compile(optimizer="sgd", jit_compile=False)
        self.assertFalse(model.jit_compile)
