"""CGCModel: fit, batch structures, baselines, explain, serialisation, the two-tape step."""

import os
import subprocess
import sys
import tempfile
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

import cgc_tf
from cgc_tf import gradcam
from tests import testing_base
from tests import testing_devices
from tests import testing_models
from tests import testing_processes


def _blob_dataset(num_examples=48, image_size=16, num_classes=3, seed=0):
    """Images with one bright square whose quadrant is the class (plus noise)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 0.3, (num_examples, image_size, image_size, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
    half = image_size // 2
    corners = [(0, 0), (0, half), (half, 0)]
    for index, label in enumerate(labels):
        top, left = corners[label]
        y = top + rng.integers(0, half - 4)
        x = left + rng.integers(0, half - 4)
        images[index, y : y + 4, x : x + 4, :] = rng.uniform(0.7, 1.0, 3)
    return images, labels


def _model(**kwargs):
    backbone = testing_models.tiny_convnet(image_size=16, num_classes=3, channels=8)
    return cgc_tf.CGCModel(backbone, target_layer="features", **kwargs)


class CGCModelTest(testing_base.TestCase):
    def setUp(self):
        super().setUp()
        keras.utils.set_random_seed(0)
        self.images, self.labels = _blob_dataset()

    def _dataset(self, batch_size=8):
        return tf.data.Dataset.from_tensor_slices((self.images, self.labels)).batch(
            batch_size, drop_remainder=True
        )

    def test_fit_lowers_both_losses(self):
        model = _model(lambda_=1.0, temperature=0.5)
        model.compile(optimizer=keras.optimizers.Adam(3e-3), metrics=["accuracy"])
        history = model.fit(self._dataset(), epochs=8, verbose=0).history
        self.assertEqual(
            set(history), {"loss", "ce_loss", "cgc_loss", "accuracy"}
        )
        self.assertLess(history["ce_loss"][-1], history["ce_loss"][0])
        self.assertLess(history["cgc_loss"][-1], history["cgc_loss"][0])
        self.assertTrue(np.all(np.isfinite(history["loss"])))
        # Every batch holds 8 examples, so the epoch means add up as each step's
        # terms do: loss = ce_loss + lambda_ * cgc_loss.
        self.assertAllClose(
            history["loss"], np.add(history["ce_loss"], 1.0 * np.array(history["cgc_loss"])),
            atol=1e-5,
        )
        # The trained weights: evaluation's CE is the CE of their predictions.
        results = model.evaluate(self._dataset(), verbose=0, return_dict=True)
        expected = keras.losses.sparse_categorical_crossentropy(
            self.labels, model.predict(self.images, verbose=0), from_logits=True
        )
        self.assertAllClose(results["ce_loss"], float(tf.reduce_mean(expected)), atol=1e-5)

    def test_evaluate_reports_losses(self):
        model = _model()
        model.compile(optimizer="sgd", metrics=["accuracy"])
        results = model.evaluate(self._dataset(), verbose=0, return_dict=True)
        self.assertEqual(set(results), {"loss", "ce_loss", "cgc_loss", "accuracy"})
        # Validation CE is the deterministic view's only.
        logits = model.predict(self.images[:48], verbose=0)
        expected = keras.losses.sparse_categorical_crossentropy(
            self.labels[:48], logits, from_logits=True
        )
        self.assertAllClose(results["ce_loss"], float(tf.reduce_mean(expected)), atol=1e-4)

    def test_dict_batches_with_classification_view(self):
        # T = a horizontal flip; the pipeline's x_xe a vertical one (not a view T makes).
        flip = cgc_tf.PairedAugmentation(
            area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), flip_probability=1.0
        )
        model = _model(views=3, augmentation=flip, lambda_=0.7, temperature=0.3)
        model.compile(optimizer="sgd")
        images = tf.constant(self.images[:4])
        batch = ({"image": images, "classification_view": images[:, ::-1]}, self.labels[:4])
        expected = _objective_by_hand(
            model.backbone, "labelled", 3, (images, images[:, ::-1], self.labels[:4], None),
            lambda_=0.7, temperature=0.3, training=True,
        )
        logs = model.train_on_batch(*batch, return_dict=True)
        self.assertTrue(np.isfinite(logs["loss"]))
        for key, value in zip(("loss", "ce_loss", "cgc_loss"), expected):
            self.assertAllClose(logs[key], value, atol=1e-5, msg=key)

    def test_unlabelled_and_semi_supervised_batches(self):
        model = _model()
        model.compile(optimizer="sgd")
        unlabelled = tf.data.Dataset.from_tensor_slices(self.images).batch(8, drop_remainder=True)
        history = model.fit(unlabelled, epochs=1, verbose=0).history
        self.assertEqual(history["ce_loss"], [0.0])
        self.assertGreater(history["cgc_loss"][0], 0.0)
        # lambda_ = 0.5; batches of equal size, so the epoch means add up as the terms.
        self.assertAllClose(history["loss"][0], 0.5 * history["cgc_loss"][0], atol=1e-6)
        semi = tf.data.Dataset.zip((self._dataset(), unlabelled))
        history = model.fit(semi, epochs=1, verbose=0).history
        self.assertGreater(history["ce_loss"][0], 0.0)
        self.assertGreater(history["cgc_loss"][0], 0.0)
        self.assertAllClose(
            history["loss"][0], history["ce_loss"][0] + 0.5 * history["cgc_loss"][0], atol=1e-5
        )

    def test_semi_supervised_labelled_ce_views(self):
        """views=3: the classification view; views=2: T(x_l); evaluation: x_l."""
        images = tf.constant(self.images[:8])
        x_xe = tf.constant(self.images[8:16])
        labels = tf.constant(self.labels[:8])
        flip_only = cgc_tf.PairedAugmentation(
            area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), flip_probability=1.0
        )
        for views, trained_on in ((3, x_xe), (2, images[:, :, ::-1])):
            model = _model(views=views, augmentation=flip_only)
            model.compile(optimizer="sgd")
            labelled = ({"image": images, "classification_view": x_xe}, labels)
            batch = (labelled, tf.constant(self.images[16:24]))

            def ce(x):
                return float(tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                    labels, model.backbone(x), from_logits=True)))

            parsed = model._parse(batch)
            trained = model._classification_part(parsed, training=True).ce
            evaluated = model._classification_part(parsed, training=False).ce
            self.assertAllClose(float(trained), ce(trained_on), atol=1e-5, msg=f"views={views}")
            self.assertAllClose(float(evaluated), ce(images), atol=1e-5, msg=f"views={views}")
            self.assertNotAllClose(ce(trained_on), ce(images))

    def test_lambda_zero_ablation_steps_on_cross_entropy_only(self):
        """lambda_=0 (the ablation): the multi-view step, cgc_loss reported without gradient."""
        deterministic = cgc_tf.PairedAugmentation(
            area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), flip_probability=1.0
        )
        images = (self.images[:4], None, self.labels[:4], None)
        weights = []
        for consistency in ("contrastive", "mse"):
            model = _model(views=2, augmentation=deterministic, lambda_=0.0, consistency=consistency)
            model.compile(optimizer=keras.optimizers.SGD(0.1))
            variables = model.trainable_weights
            before = [w.numpy() for w in variables]
            with tf.GradientTape() as tape:
                total, ce, cgc = _objective_by_hand(
                    model.backbone, "labelled", 2, images, 0.0, 0.5, training=True
                )
            gradients = tape.gradient(total, variables)
            logs = model.train_on_batch(self.images[:4], self.labels[:4], return_dict=True)
            self.assertGreater(logs["cgc_loss"], 0.0)
            self.assertAllClose(logs["loss"], logs["ce_loss"])
            self.assertAllClose(logs["ce_loss"], ce, atol=1e-5)
            if consistency == "contrastive":
                self.assertAllClose(logs["cgc_loss"], cgc, atol=1e-5)
            # One SGD step on CE(x_orig) + CE(T(x_orig)) alone.
            for variable, value, gradient in zip(variables, before, gradients, strict=True):
                self.assertAllClose(variable, value - 0.1 * gradient, atol=1e-6, msg=variable.path)
            weights.append([w.numpy() for w in variables])
        for first, second in zip(*weights):
            self.assertAllClose(first, second, atol=1e-6)

    def test_consistency_changes_the_step(self):
        deterministic = cgc_tf.PairedAugmentation(
            area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), flip_probability=1.0
        )
        kernels = []
        for lambda_ in (0.0, 1.0):
            # Both models start from tiny_convnet's seeded weights.
            model = _model(views=2, augmentation=deterministic, lambda_=lambda_)
            model.compile(optimizer=keras.optimizers.SGD(0.1))
            if lambda_:
                kernel = model.backbone.get_layer("conv1").kernel
                with tf.GradientTape() as tape:
                    cgc = _objective_by_hand(
                        model.backbone, "labelled", 2,
                        (self.images[:4], None, self.labels[:4], None), lambda_, 0.5, True,
                    )[2]
                cgc_gradient = tape.gradient(cgc, kernel).numpy()
            model.train_on_batch(self.images[:4], self.labels[:4])
            kernels.append(model.backbone.get_layer("conv1").kernel.numpy())
        self.assertGreater(np.max(np.abs(kernels[0] - kernels[1])), 1e-7)
        # SGD is linear in the gradient: the CE parts cancel, lambda_ * lr * dcgc remains.
        self.assertAllClose(kernels[1] - kernels[0], -0.1 * 1.0 * cgc_gradient, atol=1e-6)

    def test_trainable_variables_are_not_duplicated(self):
        model = _model()
        variables = model.trainable_variables
        self.assertEqual(len(variables), len({id(v) for v in variables}))
        self.assertEqual(len(variables), len(model.backbone.trainable_variables))

    def test_explain_matches_closed_form(self):
        model = _model()
        explained = model.explain(self.images[:4])
        features, logits = model.extractor(self.images[:4])
        dense = model.backbone.get_layer("logits")
        cam = gradcam.closed_form_cam(features, dense.kernel, explained["class_id"])
        self.assertAllClose(explained["heatmap"], gradcam.upsample(cam, (16, 16)), atol=1e-5)
        self.assertAllClose(explained["probabilities"], tf.nn.softmax(logits), atol=1e-6)
        self.assertEqual(explained["class_id"].dtype, tf.int32)
        given = model.explain(self.images[:4], class_index=[0, 1, 2, 0])
        cam = gradcam.closed_form_cam(features, dense.kernel, tf.constant([0, 1, 2, 0]))
        self.assertAllClose(given["heatmap"], gradcam.upsample(cam, (16, 16)), atol=1e-5)

    def test_save_load_round_trip(self):
        model = _model(lambda_=0.3, temperature=0.2, consistency="mse", views=2)
        model.compile(optimizer="sgd", metrics=["accuracy"])
        model.fit(self._dataset(), epochs=1, verbose=0)
        # explain's probabilities, class_id and heatmap agree after .keras.
        loaded = self.run_model_saving_test(model, self.images[:4], lambda m, x: m.explain(x))
        self.assertEqual(loaded.get_config()["consistency"], "mse")
        self.assertEqual(loaded.lambda_, 0.3)
        clone = self.run_serialization_test(model)
        self.assertEqual(clone.get_config()["temperature"], 0.2)

    def test_loaded_model_keeps_its_optimizer_and_trains_on(self):
        model = _model(views=2)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), metrics=["accuracy"])
        model.fit(self._dataset(), epochs=1, verbose=0)
        path = os.path.join(tempfile.mkdtemp(), "model.keras")
        model.save(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = keras.models.load_model(path)
        self.assertFalse([w for w in caught if "compile()" in str(w.message)])
        self.assertIsInstance(loaded.optimizer, keras.optimizers.SGD)
        self.assertAllClose(float(loaded.optimizer.learning_rate), 0.05)
        self.assertEqual(int(loaded.optimizer.iterations), int(model.optimizer.iterations))
        # The momentum slots came back, not freshly zeroed ones.
        saved = [v.numpy() for v in model.optimizer.variables if "momentum" in v.path]
        restored = [v.numpy() for v in loaded.optimizer.variables if "momentum" in v.path]
        self.assertLen(restored, len(saved))
        self.assertGreater(max(float(np.abs(v).max()) for v in restored), 0.0)
        for a, b in zip(saved, restored):
            self.assertAllClose(a, b)
        history = loaded.fit(self._dataset(), epochs=1, verbose=0).history
        self.assertIn("accuracy", history)
        self.assertEqual(int(loaded.optimizer.iterations), 2 * int(model.optimizer.iterations))

    @pytest.mark.slow  # a second process that imports TensorFlow: ~12 s of CPU
    def test_a_fresh_process_loads_a_cgc_train_model_with_its_optimizer(self):
        # cgc-train's optimizer has a LinearWarmup schedule; cgc-evaluate and
        # cgc-export load model.keras without importing cgc_tf.training.
        model = _model(views=2)
        schedule = cgc_tf.schedules.LinearWarmup(
            keras.optimizers.schedules.CosineDecay(0.05, 100), warmup_steps=3
        )
        model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=0.9))
        model.fit(self._dataset(), epochs=1, verbose=0)
        path = os.path.join(tempfile.mkdtemp(), "model.keras")
        model.save(path)
        script = (
            "import sys, warnings, keras, cgc_tf\n"
            "warnings.simplefilter('error')\n"
            "model = keras.models.load_model(sys.argv[1])\n"
            "print(type(model.optimizer._learning_rate).__name__, int(model.optimizer.iterations))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script, path], capture_output=True, text=True,
            cwd=testing_processes.REPO, env=testing_processes.subprocess_environment(),
        )
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertEqual(result.stdout.split()[-2:], ["LinearWarmup", str(len(self.images) // 8)])

    def test_unknown_optimizer_class_loads_without_optimizer(self):
        model = _model(views=2)
        with self.assertWarnsRegex(UserWarning, "loaded without its optimizer"):
            model.compile_from_config(
                {"optimizer": {"module": "nowhere", "class_name": "Missing", "config": {},
                               "registered_name": "nowhere>Missing"}}
            )
        self.assertFalse(model.compiled)
        self.assertAllEqual(model.predict(self.images[:2], verbose=0).shape, (2, 3))

    @pytest.mark.slow
    def test_keras_applications_backbone(self):
        backbone = keras.applications.MobileNetV2(
            input_shape=(32, 32, 3), weights=None, classes=3, classifier_activation=None, alpha=0.35
        )
        # T = a horizontal flip, so the objective can be written out below.
        flip = cgc_tf.PairedAugmentation(
            area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), flip_probability=1.0
        )
        model = cgc_tf.CGCModel(backbone, augmentation=flip, lambda_=0.5, temperature=0.5)
        # At 32x32 "out_relu" is 1x1, a constant heatmap: the last map with more
        # than one position is chosen.
        self.assertEqual(model.target_layer, "block_13_pad")
        self.assertEqual(tuple(backbone.get_layer("out_relu").output.shape[1:3]), (1, 1))
        model.compile(optimizer="sgd")
        images = tf.image.resize(self.images[:4], (32, 32))
        x_xe = images[:, ::-1]
        # Before the step (its weights): BatchNorm in training mode uses batch statistics.
        expected = _objective_from_forward(
            model.backbone, model.target_layer, images, x_xe, self.labels[:4], 0.5, 0.5
        )
        logs = model.train_on_batch(
            {"image": images, "classification_view": x_xe}, self.labels[:4], return_dict=True
        )
        self.assertTrue(np.isfinite(logs["loss"]))
        for key, value in zip(("loss", "ce_loss", "cgc_loss"), expected):
            self.assertAllClose(logs[key], value, rtol=1e-4, atol=1e-4, msg=key)
        self.assertEqual(model.explain(images)["heatmap"].shape, (4, 32, 32))

    def test_invalid_arguments(self):
        backbone = testing_models.tiny_convnet()
        for kwargs, pattern in (
            ({"temperature": 0.0}, "temperature=0.0"),
            ({"lambda_": -1.0}, "lambda_=-1.0"),
            ({"consistency": "l1"}, "consistency='l1'"),
            ({"views": 1}, "views=1"),
            ({"target_layer": "logits"}, "target_layer='logits'"),
        ):
            with self.assertRaisesRegex(ValueError, pattern):
                cgc_tf.CGCModel(backbone, **kwargs)
        # A softmax folded into a layer other than Dense: its logits cannot be read.
        inputs = keras.Input((16, 16, 3))
        x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
        x = keras.layers.EinsumDense("ab,bc->ac", output_shape=3, activation="softmax")(x)
        with self.assertRaisesRegex(ValueError, "softmax"):
            cgc_tf.CGCModel(keras.Model(inputs, x))
        with self.assertRaisesRegex(ValueError, "loss="):
            cgc_tf.CGCModel(backbone).compile(optimizer="sgd", loss="mse")


# ------------------------------------------------ the objective written out by hand


def _objective_by_hand(backbone, kind, views, images, lambda_, temperature, training):
    """(total, ce, cgc) of one CGC step, T = a horizontal flip of the whole image.

    The closed form of Grad-CAM for tiny_convnet's pooling + dense head,
    cam = ReLU(F . W[:, c]) / (h * w), replaces the inner gradient; InfoNCE as a
    log-sum-exp over the positive and the other examples' anchors.
    """
    x_orig, x_xe, labels, x_unlabelled = images
    extractor = keras.Model(
        backbone.inputs, [backbone.get_layer("features").output, backbone.outputs[0]]
    )
    kernel = backbone.get_layer("logits").kernel

    def cross_entropy(x):
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            labels, backbone(x), from_logits=True))

    def heatmap(features, class_index):
        weights = tf.gather(kernel, class_index, axis=1)
        cam = tf.nn.relu(tf.einsum("bhwk,kb->bhw", features, weights)) / 64.0  # 8x8 map
        cam = tf.image.resize(cam[..., None], (16, 16), method="bilinear")[..., 0]
        return cam / (tf.reduce_sum(cam, axis=[1, 2], keepdims=True) + 1e-8) + 1e-8

    def info_nce(x):
        features_orig, logits_orig = extractor(x)
        features_aug, _ = extractor(x[:, :, ::-1])
        class_index = tf.argmax(logits_orig, axis=-1)
        flat = lambda cam: tf.math.l2_normalize(tf.reshape(cam, [4, -1]), axis=-1)
        anchors = flat(heatmap(features_aug, class_index))
        positives = flat(heatmap(features_orig, class_index)[:, :, ::-1])
        positive = tf.reduce_sum(anchors * positives, axis=-1) / temperature
        others = tf.where(
            tf.eye(4, dtype=tf.bool), -1e9, tf.matmul(anchors, anchors, transpose_b=True)
            / temperature
        )
        every = tf.concat([positive[:, None], others], axis=1)
        return tf.reduce_mean(tf.reduce_logsumexp(every, axis=1) - positive)

    if kind == "unlabelled":
        ce, cgc = tf.constant(0.0), info_nce(x_unlabelled)
    elif kind == "semi_supervised":
        view = x_orig if not training else x_xe if views == 3 else x_orig[:, :, ::-1]
        ce, cgc = cross_entropy(view), info_nce(x_unlabelled)
    else:
        ce, cgc = cross_entropy(x_orig), info_nce(x_orig)
        if training:
            ce += cross_entropy(x_orig[:, :, ::-1]) + (cross_entropy(x_xe) if views == 3 else 0.0)
    return ce + lambda_ * cgc, ce, cgc


def _bilinear_matrix(size_out, size_in):
    """[size_out, size_in] weights of tf.image.resize's bilinear (half-pixel) resampling."""
    source = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
    lower = np.floor(source).astype(int)
    upper = np.minimum(lower + 1, size_in - 1)
    matrix = np.zeros((size_out, size_in))
    matrix[np.arange(size_out), lower] += 1.0 - (source - lower)
    matrix[np.arange(size_out), upper] += source - lower
    return matrix


def _objective_from_forward(backbone, target_layer, x_orig, x_xe, labels, lambda_, temperature):
    """(total, ce, cgc) of one views=3 labelled step with T = a horizontal flip, in numpy.

    Any backbone: only the forward passes (training mode) and dz_c/dF come from
    TensorFlow; Grad-CAM as gradient x activation, the bilinear upsampling, the
    normalisations, InfoNCE over the other anchors and the cross-entropies are
    written out here.
    """
    extractor = keras.Model(
        backbone.inputs, [backbone.get_layer(target_layer).output, backbone.outputs[0]]
    )
    labels = np.asarray(labels)
    height, width = x_orig.shape[1:3]

    def forward(images, class_index=None):
        with tf.GradientTape() as tape:
            features, logits = extractor(images, training=True)
            if class_index is None:
                class_index = np.argmax(logits.numpy(), axis=-1)
            score = tf.reduce_sum(tf.gather(logits, class_index, axis=1, batch_dims=1))
        gradients = tape.gradient(score, features).numpy().astype(np.float64)
        cam = np.maximum(np.sum(gradients * features.numpy(), axis=-1), 0.0)
        rows = _bilinear_matrix(height, cam.shape[1])
        columns = _bilinear_matrix(width, cam.shape[2])
        cam = np.einsum("Hh,bhw,Ww->bHW", rows, cam, columns)
        cam = cam / (cam.sum(axis=(1, 2), keepdims=True) + 1e-8) + 1e-8
        return np.asarray(logits, np.float64), cam, class_index

    def cross_entropy(logits):
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_softmax = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        return -np.mean(log_softmax[np.arange(len(labels)), labels])

    def flat(cam):
        flat = cam.reshape(len(cam), -1)
        return flat / np.linalg.norm(flat, axis=-1, keepdims=True)

    logits_orig, cam_orig, class_index = forward(x_orig)
    logits_aug, cam_aug, _ = forward(x_orig[:, :, ::-1], class_index)
    logits_xe = np.asarray(backbone(x_xe, training=True), np.float64)
    anchors, positives = flat(cam_aug), flat(cam_orig[:, :, ::-1])
    similarities = anchors @ anchors.T / temperature
    np.fill_diagonal(similarities, -np.inf)
    positive = np.sum(anchors * positives, axis=-1) / temperature
    every = np.concatenate([positive[:, None], similarities], axis=1)
    largest = every.max(axis=1)
    cgc = np.mean(largest + np.log(np.exp(every - largest[:, None]).sum(axis=1)) - positive)
    ce = cross_entropy(logits_orig) + cross_entropy(logits_aug) + cross_entropy(logits_xe)
    return ce + lambda_ * cgc, ce, cgc


class ObjectiveByHandTest(tf.test.TestCase, parameterized.TestCase):
    """train_step and test_step against the CGC objective written out by hand."""

    @parameterized.named_parameters(
        ("labelled_views3", "labelled", 3),
        ("labelled_views2", "labelled", 2),
        ("unlabelled", "unlabelled", 3),
        ("semi_supervised_views3", "semi_supervised", 3),
        ("semi_supervised_views2", "semi_supervised", 2),
    )
    def test_step_and_evaluation_equal_the_objective(self, kind, views):
        lambda_, temperature = 0.7, 0.3
        flip = cgc_tf.PairedAugmentation(
            area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), flip_probability=1.0
        )
        model = cgc_tf.CGCModel(
            testing_models.tiny_convnet(16), target_layer="features", views=views,
            lambda_=lambda_, temperature=temperature, augmentation=flip,
        )
        # SGD(1.0) without momentum: each weight moves by exactly minus its gradient.
        model.compile(optimizer=keras.optimizers.SGD(1.0))
        images = (_random_images(0), _random_images(1), np.array([0, 1, 2, 1]), _random_images(2))
        labelled = ({"image": images[0], "classification_view": images[1]}, images[2])
        data = {"labelled": labelled, "unlabelled": images[3],
                "semi_supervised": (labelled, images[3])}[kind]
        dataset = tf.data.Dataset.from_tensors(data)

        variables = model.trainable_variables
        before = [variable.numpy() for variable in variables]
        with tf.GradientTape() as tape:
            expected = _objective_by_hand(
                model.backbone, kind, views, images, lambda_, temperature, training=True
            )
        gradients = tape.gradient(expected[0], variables)
        logs = {key: values[0] for key, values in model.fit(dataset, verbose=0).history.items()}
        for key, value in zip(("loss", "ce_loss", "cgc_loss"), expected):
            self.assertAllClose(logs[key], value, atol=1e-5, msg=key)
        for variable, value, gradient in zip(variables, before, gradients):
            # No gradient: the logits bias of an unlabelled batch (Grad-CAM ignores it).
            step = 0.0 if gradient is None else gradient
            self.assertAllClose(variable, value - step, atol=1e-5, msg=variable.path)
        self.assertGreater(max(float(np.abs(v - b).max()) for v, b in zip(variables, before)), 1e-4)

        # Evaluation on the updated weights: CE of x_orig only, the same consistency.
        expected = _objective_by_hand(
            model.backbone, kind, views, images, lambda_, temperature, training=False
        )
        results = model.evaluate(dataset, verbose=0, return_dict=True)
        for key, value in zip(("loss", "ce_loss", "cgc_loss"), expected):
            self.assertAllClose(results[key], value, atol=1e-5, msg=key)


# ------------------------------------------------ the plain baseline (consistency="none")


class _CountingIdentity(keras.layers.Layer):
    """Identity that counts its calls: one per forward pass through the backbone."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def call(self, inputs):
        self.calls += 1
        return inputs


def _counting_backbone():
    """tiny_convnet's layers behind a counting input layer; also the counter."""
    keras.utils.set_random_seed(0)
    counter = _CountingIdentity(name="count")
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(counter(inputs))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same")(x)
    x = keras.layers.Activation("relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x)), counter


class PlainBaselineTest(tf.test.TestCase, parameterized.TestCase):
    """consistency="none" is the reference's baseline_train_eval.py: one view, one CE."""

    def setUp(self):
        super().setUp()
        self.images = tf.constant(_random_images(0))
        self.view = tf.constant(_random_images(1))
        self.labels = tf.constant([0, 1, 2, 1])

    def _keras_classifier_step(self, images):
        """Weights and loss after one step of tiny_convnet compiled as a Keras classifier."""
        classifier = testing_models.tiny_convnet(16, batch_norm=True)
        classifier.compile(
            optimizer=keras.optimizers.SGD(1.0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        loss = classifier.train_on_batch(images, self.labels)
        return [w.numpy() for w in classifier.weights], float(loss)

    @parameterized.named_parameters(("views3", 3), ("views2", 2))
    def test_step_equals_a_keras_classifier_step_on_the_same_view(self, views):
        # views=3 trains on the pipeline's classification view; views=2 on T(x_orig),
        # here a flip of the whole image.
        flip = cgc_tf.PairedAugmentation(
            area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), flip_probability=1.0
        )
        model = cgc_tf.CGCModel(
            testing_models.tiny_convnet(16, batch_norm=True), target_layer="features",
            consistency="none", views=views, augmentation=flip,
        )
        # SGD(1.0) without momentum: each weight moves by exactly minus its gradient.
        model.compile(optimizer=keras.optimizers.SGD(1.0), metrics=["accuracy"])
        batch = {"image": self.images, "classification_view": self.view}
        logs = model.train_on_batch(batch, self.labels, return_dict=True)
        self.assertEqual(set(logs), {"loss", "ce_loss", "accuracy"})
        trained_on = self.view if views == 3 else self.images[:, :, ::-1]
        expected_weights, expected_loss = self._keras_classifier_step(trained_on)
        self.assertAllClose(logs["loss"], expected_loss, atol=1e-6)
        self.assertAllClose(logs["ce_loss"], expected_loss, atol=1e-6)
        # Every weight, BatchNorm's moving statistics included.
        for actual, expected in zip(model.backbone.weights, expected_weights, strict=True):
            self.assertAllClose(actual.numpy(), expected, atol=1e-6, msg=actual.path)

    def test_one_backbone_forward_per_step(self):
        forwards = {}
        for consistency, views in (("none", 3), ("none", 2), ("contrastive", 2),
                                   ("contrastive", 3)):
            backbone, counter = _counting_backbone()
            model = cgc_tf.CGCModel(
                backbone, target_layer="features", consistency=consistency, views=views
            )
            # Eager: the counter counts executed forward passes, not traces.
            model.compile(optimizer="sgd", run_eagerly=True)
            counter.calls = 0
            model.train_on_batch({"image": self.images, "classification_view": self.view},
                                 self.labels)
            forwards[(consistency, views)] = counter.calls
            counter.calls = 0
            model.test_on_batch(self.images, self.labels)
            forwards[(consistency, views, "test")] = counter.calls
        self.assertEqual(forwards[("none", 3)], 1)
        self.assertEqual(forwards[("none", 2)], 1)
        self.assertEqual(forwards[("none", 3, "test")], 1)
        # The oracle counts: CGC forwards x_orig and x_aug (and x_xe with views=3).
        self.assertEqual(forwards[("contrastive", 2)], 2)
        self.assertEqual(forwards[("contrastive", 3)], 3)

    def test_evaluate_reports_accuracy_and_cross_entropy_of_the_given_view(self):
        model = cgc_tf.CGCModel(
            testing_models.tiny_convnet(16), target_layer="features", consistency="none"
        )
        model.compile(optimizer="sgd", metrics=["accuracy"])
        results = model.evaluate(self.images, self.labels, verbose=0, return_dict=True)
        self.assertEqual(set(results), {"loss", "ce_loss", "accuracy"})
        logits = model.backbone(self.images)
        expected = keras.losses.sparse_categorical_crossentropy(
            self.labels, logits, from_logits=True
        )
        self.assertAllClose(results["ce_loss"], float(tf.reduce_mean(expected)), atol=1e-6)
        accuracy = np.mean(np.argmax(logits, axis=-1) == self.labels.numpy())
        self.assertAllClose(results["accuracy"], accuracy)
        # Explanations still come from Grad-CAM of the trained network.
        self.assertEqual(model.explain(self.images)["heatmap"].shape, (4, 16, 16))

    @parameterized.named_parameters(("unlabelled", "unlabelled"),
                                    ("semi_supervised", "semi_supervised"))
    def test_batches_without_labels_are_refused(self, kind):
        model = cgc_tf.CGCModel(
            testing_models.tiny_convnet(16), target_layer="features", consistency="none"
        )
        model.compile(optimizer="sgd")
        with self.assertRaisesRegex(ValueError, "consistency='none'.*labelled"):
            model.train_step(_split_batch(kind))


# ------------------------------------------------ the two-tape train step
# train_step differentiates the classification part (CE of x_xe, or of the labelled
# half of a semi-supervised batch) in its own tape, after the consistency part's
# gradients, so that the two parts' activations are never alive together.


def _random_images(seed, size=16, batch=4):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(batch, size, size, 3)).astype(np.float32)


def _split_batch(kind):
    """A batch of each structure `CGCModel.fit` accepts (4 images of 16x16)."""
    images = tf.constant(_random_images(0))
    labels = tf.constant([0, 1, 2, 1])
    if kind == "labelled":
        return ({"image": images, "classification_view": tf.constant(_random_images(1))}, labels)
    if kind == "labelled_on_device_view":
        return (images, labels)
    if kind == "labelled_weighted":
        return (images, labels, tf.constant([1.0, 0.5, 0.0, 2.0]))
    if kind == "unlabelled":
        return images
    if kind == "semi_supervised":
        return ((images, labels), tf.constant(_random_images(2)))
    raise ValueError(f"kind={kind!r}")


def _split_model(views, optimizer=None):
    model = cgc_tf.CGCModel(
        testing_models.tiny_convnet(16, batch_norm=True),
        target_layer="features",
        views=views,
        lambda_=1.0,
        augmentation=cgc_tf.PairedAugmentation(seed=1),
    )
    model.classification_augmentation = cgc_tf.PairedAugmentation(seed=2)
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.1))
    return model


class _SeedStates:
    """Saves the model's random state; `restore()` makes the next step draw the same T."""

    def __init__(self, model):
        self.variables = [
            model.augmentation.seed_generator.state,
            model.classification_augmentation.seed_generator.state,
        ]
        self.values = [variable.numpy() for variable in self.variables]

    def restore(self):
        for variable, value in zip(self.variables, self.values):
            variable.assign(value)


class SplitGradientsTest(tf.test.TestCase, parameterized.TestCase):
    def tearDown(self):
        keras.mixed_precision.set_global_policy("float32")
        super().tearDown()

    @parameterized.named_parameters(
        ("labelled_views3", "labelled", 3),
        ("labelled_views2", "labelled", 2),
        ("labelled_on_device_view_views3", "labelled_on_device_view", 3),
        ("labelled_weighted_views3", "labelled_weighted", 3),
        ("unlabelled_views3", "unlabelled", 3),
        ("unlabelled_views2", "unlabelled", 2),
        ("semi_supervised_views3", "semi_supervised", 3),
        ("semi_supervised_views2", "semi_supervised", 2),
    )
    def test_split_gradients_equal_one_tape(self, kind, views):
        model = _split_model(views)
        batch = model._parse(_split_batch(kind))
        variables = model.trainable_variables
        seeds = _SeedStates(model)
        with tf.GradientTape() as tape:
            expected_terms = model._forward(batch, training=True)
        expected = tape.gradient(expected_terms.total, variables)

        seeds.restore()
        # Traced, as fit runs it: the second tape's inputs wait on control dependencies.
        terms, gradients = tf.function(model._loss_and_gradients)(batch)

        split = kind != "unlabelled" and (views == 3 or kind == "semi_supervised")
        self.assertEqual(model._has_classification_part(batch, training=True), split)
        for name in ("total", "ce", "cgc"):
            self.assertAllClose(
                getattr(terms, name), getattr(expected_terms, name), atol=1e-6, msg=name
            )
        if expected_terms.logits is None:
            self.assertIsNone(terms.logits)
        else:
            self.assertAllClose(terms.logits, expected_terms.logits, atol=1e-6)
        for variable, gradient, expected_gradient in zip(variables, gradients, expected):
            if expected_gradient is None:
                # The logits bias of an unlabelled batch: it does not reach Grad-CAM.
                self.assertIsNone(gradient, msg=variable.path)
            else:
                self.assertAllClose(
                    gradient, expected_gradient, atol=1e-5, msg=variable.path
                )
        self.assertGreater(np.abs(gradients[0].numpy()).max(), 0.0)

    def test_float16_loss_scale_applies_to_both_tapes(self):
        keras.mixed_precision.set_global_policy("mixed_float16")
        # A small loss scale: at the default 2**15 this tiny model's float16 gradients
        # overflow now and then (in the one-tape step too), and the step is skipped.
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1), initial_scale=2.0**6
        )
        model = _split_model(views=3, optimizer=optimizer)
        batch = model._parse(_split_batch("labelled"))
        variables = model.trainable_variables
        seeds = _SeedStates(model)
        with tf.GradientTape() as tape:
            total = model._forward(batch, training=True).total
            scaled = model.optimizer.scale_loss(total)
        expected = tape.gradient(scaled, variables)
        seeds.restore()
        _, gradients = tf.function(model._loss_and_gradients)(batch)
        for variable, gradient, expected_gradient in zip(variables, gradients, expected):
            scale = np.abs(expected_gradient.numpy()).max()
            self.assertTrue(np.all(np.isfinite(gradient.numpy())), msg=variable.path)
            self.assertAllClose(
                gradient / scale, expected_gradient / scale, atol=1e-2, msg=variable.path
            )


class _OneStepUnderStrategy:
    """One fit step of `_model()` on two replicas against the same global batch on one device.

    Subclasses define `_features()`, `_model()` (built in the strategy's scope) and
    `HISTORY_KEYS`, the logged losses compared.
    """

    def _one_step(self, strategy):
        features = self._features()
        with strategy.scope():
            model = self._model()
            model.compile(optimizer=keras.optimizers.SGD(0.5))
        history = model.fit(
            features, np.array([0, 1, 2, 1]), batch_size=4, shuffle=False, verbose=0
        )
        return [variable.numpy() for variable in model.trainable_variables], history.history

    def test_matches_single_device(self):
        expected_weights, expected_history = self._one_step(tf.distribute.get_strategy())
        weights, history = self._one_step(self.strategy)
        for key in self.HISTORY_KEYS:
            self.assertAllClose(history[key], expected_history[key], atol=1e-5, msg=key)
        for actual, expected in zip(weights, expected_weights):
            self.assertAllClose(actual, expected, atol=1e-5)


class SplitStepUnderStrategyTest(_OneStepUnderStrategy, testing_devices.TwoReplicaTestCase):
    """views=3 (two tapes) on two replicas against the same global batch on one device."""

    HISTORY_KEYS = ("loss", "ce_loss", "cgc_loss")

    def _features(self):
        images = _random_images(0)
        return {"image": images, "classification_view": np.flip(images, axis=1).copy()}

    def _model(self):
        return cgc_tf.CGCModel(
            testing_models.tiny_convnet(16),
            views=3,
            lambda_=1.0,
            global_negatives=True,
            # T = a flip of the whole image: both runs see the same views.
            augmentation=cgc_tf.PairedAugmentation(
                area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), flip_probability=1.0
            ),
        )


class PlainStepUnderStrategyTest(_OneStepUnderStrategy, testing_devices.TwoReplicaTestCase):
    """The plain baseline's step on two replicas against the same global batch on one device."""

    HISTORY_KEYS = ("loss", "ce_loss")

    def _features(self):
        return {"image": _random_images(0), "classification_view": _random_images(1)}

    def _model(self):
        return cgc_tf.CGCModel(testing_models.tiny_convnet(16), consistency="none", views=3)


if __name__ == "__main__":
    tf.test.main()
