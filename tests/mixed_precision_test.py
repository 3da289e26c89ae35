"""CGCModel under Keras mixed precision: float32 heatmaps, finite gradients, loss scaling."""

import contextlib
import io
import os
import shutil
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import cgc_tf
from cgc_tf import config as config_lib
from cgc_tf import model_dir as layout
from cgc_tf import training
from tests import testing_models

IMAGE_SIZE = 16


def _batch(size=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(size, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    return images, (np.arange(size) % 3).astype(np.int32)


def _flip_augmentation():
    """A deterministic T (flip the whole image), so two runs see the same views."""
    return cgc_tf.PairedAugmentation(
        area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), flip_probability=1.0
    )


class MixedPrecisionTest(tf.test.TestCase):
    def tearDown(self):
        # The policy is process-global: never leak it into other tests.
        keras.mixed_precision.set_global_policy("float32")
        super().tearDown()

    def _model(self, policy, **arguments):
        keras.mixed_precision.set_global_policy(policy)
        return cgc_tf.CGCModel(
            testing_models.tiny_convnet(IMAGE_SIZE), views=2, lambda_=1.0, **arguments
        )

    def test_bfloat16_heatmaps_and_gradients(self):
        model = self._model("mixed_bfloat16", augmentation=cgc_tf.PairedAugmentation(seed=0))
        images, _ = _batch()
        features, logits = model.extractor(images)
        # The backbone really computes in bfloat16 ...
        self.assertEqual(features.dtype, tf.bfloat16)
        self.assertEqual(logits.dtype, tf.bfloat16)
        with tf.GradientTape() as tape:
            terms = model.consistency_terms(tf.constant(images), training=True)
        # ... while the heatmaps, logits and loss that leave it are float32.
        for key in ("logits_orig", "logits_aug", "anchors", "positives", "loss"):
            self.assertEqual(terms[key].dtype, tf.float32, msg=key)
        self.assertTrue(np.isfinite(terms["loss"].numpy()))
        # ZERO: the logits bias does not reach Grad-CAM (dz_c/dF ignores it).
        gradients = tape.gradient(
            terms["loss"], [variable.value for variable in model.trainable_variables],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        for variable, gradient in zip(model.trainable_variables, gradients):
            self.assertEqual(variable.dtype, "float32")
            self.assertTrue(np.all(np.isfinite(gradient.numpy())), msg=variable.path)
        # Second order: the conv weights get gradient through the Grad-CAM maps.
        self.assertGreater(np.abs(gradients[0].numpy()).max(), 0.0)

    def test_bfloat16_fit_lowers_the_loss(self):
        model = self._model("mixed_bfloat16", augmentation=cgc_tf.PairedAugmentation(seed=0))
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        images, labels = _batch(8)
        history = model.fit(images, labels, batch_size=4, epochs=6, shuffle=False, verbose=0)
        losses = history.history["loss"]
        self.assertTrue(np.all(np.isfinite(losses)), msg=losses)
        self.assertLess(losses[-1], losses[0] - 0.1, msg=losses)
        for variable in model.trainable_variables:
            self.assertTrue(np.all(np.isfinite(variable.numpy())), msg=variable.path)

    def test_float16_loss_scale_is_undone(self):
        images, labels = _batch()

        def one_step(policy):
            model = self._model(policy, augmentation=_flip_augmentation())
            model.compile(optimizer=keras.optimizers.SGD(0.1))
            before = [variable.numpy() for variable in model.trainable_variables]
            model.fit(images, labels, batch_size=4, epochs=1, verbose=0)
            steps = [v.numpy() - b for v, b in zip(model.trainable_variables, before)]
            return model, steps

        _, expected_steps = one_step("float32")
        model, steps = one_step("mixed_float16")
        # compile() wrapped the optimizer; train_step's optimizer.scale_loss
        # multiplied the loss by the dynamic scale (2**15) ...
        self.assertIsInstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        # ... the gradients were finite, so the step was applied and the scale kept ...
        self.assertEqual(float(model.optimizer.dynamic_scale.numpy()), 2.0**15)
        self.assertEqual(int(model.optimizer.iterations.numpy()), 1)
        # ... and optimizer.apply divided it out: the float16 step is the float32
        # step up to float16 rounding (not 32768 times larger).
        for step, expected in zip(steps, expected_steps):
            scale = np.abs(expected).max()
            self.assertGreater(scale, 0.0)
            self.assertAllClose(step / scale, expected / scale, atol=3e-2)


@pytest.mark.slow
class MixedPrecisionTrainingTest(tf.test.TestCase):
    """run_training with a mixed policy: it says which, and saves a float32 model."""

    def test_bfloat16_run_saves_a_float32_model(self):
        root = tempfile.mkdtemp(prefix="cgc_tf_mixed_precision_test_")
        self.addCleanup(shutil.rmtree, root, ignore_errors=True)
        config = config_lib.TrainConfig(
            data_dir=os.path.join(root, "tfds"), image_size=IMAGE_SIZE, batch_size=4,
            steps_per_epoch=2, epochs=1, warmup_epochs=0, model_dir=os.path.join(root, "run"),
            export=False, mixed_precision="mixed_bfloat16",
        )
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            metrics = training.run_training(config, progress=True)
        self.assertIn(
            "Precision: mixed_bfloat16 (mixed_precision='mixed_bfloat16')", output.getvalue()
        )
        self.assertTrue(np.isfinite(metrics["ce_loss"]))
        # The run restored the process's policy ...
        self.assertEqual(keras.mixed_precision.global_policy().name, "float32")
        # ... and the saved model computes in float32 (its weights are the trained ones).
        model = keras.models.load_model(os.path.join(config.model_dir, layout.MODEL_FILE))
        self.assertEqual(model.backbone.compute_dtype, "float32")
        for layer in model.backbone.layers:
            self.assertEqual(layer.dtype_policy.name, "float32", msg=layer.name)
        last_epoch = keras.models.load_model(
            os.path.join(config.model_dir, layout.EPOCH_MODEL_FILE)
        )
        policies = {layer.dtype_policy.name for layer in last_epoch.backbone.layers}
        self.assertIn("mixed_bfloat16", policies)  # the model that trained
        for saved, trained in zip(model.backbone.weights, last_epoch.backbone.weights):
            self.assertAllEqual(saved, trained)
