"""Tests for cgc_tf.augment: paired geometric transforms."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import keras_cv  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl.testing import parameterized  # noqa: E402

from cgc_tf import augment  # noqa: E402

BATCH = 3


def _images(batch=BATCH, height=16, width=16, channels=3, seed=0):
    return tf.random.stateless_uniform([batch, height, width, channels], seed=[seed, 1])


def _reference_warp(inputs, transform):
    """tf.image.crop_and_resize + flip_left_right: the oracle for the default T."""
    batch, height, width = inputs.shape[0], inputs.shape[1], inputs.shape[2]
    cropped = tf.image.crop_and_resize(
        inputs, transform["boxes"], tf.range(batch), (height, width)
    )
    return tf.where(
        transform["flips"][:, None, None, None], tf.image.flip_left_right(cropped), cropped
    )


class TorchvisionCropModeTest(tf.test.TestCase):
    def test_torchvision_crops_are_integer_and_in_range(self):
        augmentation = augment.PairedAugmentation(crop_mode="torchvision", seed=3)
        transform = augmentation.sample(2000, 24, 32)
        self.assertNotIn("boxes", transform)
        crops = transform["crops"].numpy()
        self.assertEqual(crops.dtype, np.int32)
        top, left, height, width = crops.T
        self.assertTrue(np.all((top >= 0) & (left >= 0) & (height >= 1) & (width >= 1)))
        self.assertTrue(np.all((top + height <= 24) & (left + width <= 32)))
        areas = height * width / (24 * 32)
        # Rounded sides: areas within a pixel row/column of [0.08, 1].
        self.assertGreater(areas.min(), 0.08 - 0.1)
        self.assertLess(areas.min(), 0.12)
        self.assertEqual(areas.max(), 1.0)
        self.assertGreater(np.std(top), 1.0)
        self.assertGreater(np.std(left), 1.0)

    def test_torchvision_fallback_is_the_central_crop(self):
        # Square crops cannot cover a 16x32 image, and area 1 needs the whole image:
        # every candidate fails, torchvision takes the central 16x16 crop.
        augmentation = augment.PairedAugmentation(
            area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), crop_mode="torchvision"
        )
        crops = augmentation.sample(BATCH, 16, 32)["crops"]
        self.assertAllEqual(tf.tile([[0, 8, 16, 16]], [BATCH, 1]), crops)


class PairedAugmentationTest(tf.test.TestCase, parameterized.TestCase):
    def setUp(self):
        super().setUp()
        keras.utils.set_random_seed(1234)

    @parameterized.named_parameters(("square", 16, 16), ("wide", 16, 24), ("tall", 20, 12))
    def test_flip_only_equals_flip_left_right(self, height, width):
        ratio = width / height
        augmentation = augment.PairedAugmentation(
            area_range=(1.0, 1.0), aspect_ratio_range=(ratio, ratio), flip_probability=1.0
        )
        images = _images(height=height, width=width)
        transform = augmentation.sample(BATCH, height, width)
        self.assertAllEqual(transform["boxes"], tf.tile([[0.0, 0.0, 1.0, 1.0]], [BATCH, 1]))
        self.assertAllClose(
            tf.image.flip_left_right(images),
            augmentation.apply_to_images(images, transform),
            atol=1e-6,
            rtol=0,
        )
        self.assertAllClose(
            tf.image.flip_left_right(images)[..., 0],
            augmentation.apply_to_heatmaps(images[..., 0], transform),
            atol=1e-6,
            rtol=0,
        )

    def test_no_flip_full_box_is_identity(self):
        augmentation = augment.PairedAugmentation(
            area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), flip_probability=0.0
        )
        images = _images()
        transform = augmentation.sample(BATCH, 16, 16)
        self.assertAllClose(
            images, augmentation.apply_to_images(images, transform), atol=1e-6, rtol=0
        )

    @parameterized.named_parameters(
        ("square_rank3", 16, 16, False), ("rectangular_rank4", 24, 32, True)
    )
    def test_heatmaps_match_crop_and_resize(self, height, width, channel_axis):
        augmentation = augment.PairedAugmentation()
        batch = 8
        heatmaps = _images(batch=batch, height=height, width=width, channels=1)
        transform = augmentation.sample(batch, height, width)
        expected = _reference_warp(heatmaps, transform)
        if channel_axis:
            got = augmentation.apply_to_heatmaps(heatmaps, transform)
        else:
            got = augmentation.apply_to_heatmaps(heatmaps[..., 0], transform)[..., None]
        self.assertEqual(got.shape, heatmaps.shape)
        self.assertAllClose(expected, got, atol=1e-5, rtol=0)
        # The sample exercises both flip states and genuine crops.
        box_heights = transform["boxes"][:, 2] - transform["boxes"][:, 0]
        self.assertLess(float(tf.reduce_min(box_heights)), 1.0)

    def test_image_channel_as_heatmap_matches_image_output(self):
        augmentation = augment.PairedAugmentation()
        images = _images(height=32, width=32)
        transform = augmentation.sample(BATCH, 32, 32)
        warped_images = augmentation.apply_to_images(images, transform)
        for channel in range(3):
            self.assertAllClose(
                warped_images[..., channel],
                augmentation.apply_to_heatmaps(images[..., channel], transform),
                atol=1e-6,
                rtol=0,
            )

    @parameterized.named_parameters(
        ("default_square", (0.08, 1.0), (3 / 4, 4 / 3), 32, 32),
        ("default_rectangular", (0.08, 1.0), (3 / 4, 4 / 3), 24, 32),
        ("narrow", (0.3, 0.5), (0.5, 2.0), 32, 32),
    )
    def test_box_statistics(self, area_range, aspect_ratio_range, height, width):
        augmentation = augment.PairedAugmentation(
            area_range=area_range, aspect_ratio_range=aspect_ratio_range
        )
        transform = augmentation.sample(2000, height, width)
        boxes = transform["boxes"].numpy()
        self.assertTrue(np.all(boxes >= 0.0) and np.all(boxes <= 1.0))
        box_heights = boxes[:, 2] - boxes[:, 0]
        box_widths = boxes[:, 3] - boxes[:, 1]
        areas = box_heights * box_widths
        ratios = (box_widths * width) / (box_heights * height)
        tolerance = 1e-5
        self.assertGreaterEqual(areas.min(), area_range[0] - tolerance)
        self.assertLessEqual(areas.max(), area_range[1] + tolerance)
        self.assertGreaterEqual(ratios.min(), aspect_ratio_range[0] * (1 - tolerance))
        self.assertLessEqual(ratios.max(), aspect_ratio_range[1] * (1 + tolerance))
        # The samples span the ranges (large areas are rarer: they often do not fit).
        span = area_range[1] - area_range[0]
        self.assertLess(areas.min(), area_range[0] + 0.05 * span)
        self.assertGreater(areas.max(), area_range[1] - 0.1 * span)
        self.assertLess(ratios.min(), aspect_ratio_range[0] * 1.05)
        self.assertGreater(ratios.max(), aspect_ratio_range[1] * 0.95)
        # Positions vary across the image, and about half the examples flip.
        self.assertGreater(np.std(boxes[:, 0]), 0.05)
        self.assertGreater(np.std(boxes[:, 1]), 0.05)
        self.assertBetween(float(np.mean(transform["flips"].numpy())), 0.45, 0.55)

    def test_fallback_is_central_crop(self):
        # A square box of the whole area never fits a 16x32 image: torchvision falls
        # back to the central crop with the ratio clipped into range.
        augmentation = augment.PairedAugmentation(
            area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0)
        )
        transform = augmentation.sample(BATCH, 16, 32)
        self.assertAllClose(tf.tile([[0.0, 0.25, 1.0, 0.75]], [BATCH, 1]), transform["boxes"])

    @parameterized.named_parameters(
        ("default", lambda: []),
        (
            # One compilation for all layers with an XLA path keeps the test fast.
            "all_xla_layers",
            lambda: [
                keras_cv.layers.RandomFlip("vertical"),
                keras.layers.RandomFlip("vertical"),
                keras_cv.layers.RandomShear(x_factor=0.2),
                keras.layers.RandomRotation(0.2, fill_mode="wrap"),
            ],
        ),
    )
    def test_xla_matches_eager(self, make_layers):
        augmentation = augment.PairedAugmentation(geometric_layers=make_layers())
        self.assertTrue(augmentation.xla_compatible)
        augmentation.require_xla_compatible()
        images = _images()
        heatmaps = images[..., 0]

        @tf.function(jit_compile=True)
        def compiled(images, heatmaps):
            transform = augmentation.sample(BATCH, 16, 16)
            return (
                transform,
                augmentation.apply_to_images(images, transform),
                augmentation.apply_to_heatmaps(heatmaps, transform),
            )

        transform, warped_images, warped_heatmaps = compiled(images, heatmaps)
        self.assertAllClose(
            augmentation.apply_to_images(images, transform), warped_images, atol=1e-5
        )
        self.assertAllClose(
            augmentation.apply_to_heatmaps(heatmaps, transform), warped_heatmaps, atol=1e-5
        )
        if not augmentation.geometric_layers:
            self.assertAllClose(
                _reference_warp(images, transform)[..., 0], warped_heatmaps, atol=1e-5
            )

    @parameterized.named_parameters(
        ("default", lambda: []),
        ("keras_cv_rotation", lambda: [keras_cv.layers.RandomRotation(0.1)]),
        ("keras_rotation", lambda: [keras.layers.RandomRotation(0.1)]),
    )
    def test_gradients_reach_heatmaps(self, make_layers):
        augmentation = augment.PairedAugmentation(geometric_layers=make_layers())
        heatmaps = _images(channels=1)[..., 0]
        transform = augmentation.sample(BATCH, 16, 16)
        with tf.GradientTape() as tape:
            tape.watch(heatmaps)
            loss = tf.reduce_sum(augmentation.apply_to_heatmaps(heatmaps, transform) ** 2)
        gradient = tape.gradient(loss, heatmaps)
        self.assertIsNotNone(gradient)
        self.assertTrue(np.all(np.abs(gradient.numpy()).sum(axis=(1, 2)) > 0))

    @parameterized.named_parameters(
        ("keras_cv_rotation_reflect", lambda: keras_cv.layers.RandomRotation(0.2)),
        (
            "keras_cv_rotation_wrap_nearest",
            lambda: keras_cv.layers.RandomRotation(0.2, fill_mode="wrap", interpolation="nearest"),
        ),
        (
            "keras_cv_zoom_nearest_fill",
            lambda: keras_cv.layers.RandomZoom(0.3, fill_mode="nearest"),
        ),
        (
            "keras_cv_translation_constant",
            lambda: keras_cv.layers.RandomTranslation(
                0.2, 0.2, fill_mode="constant", fill_value=0.5
            ),
        ),
        ("keras_cv_shear", lambda: keras_cv.layers.RandomShear(0.3, 0.3)),
        ("keras_cv_shear_x_only", lambda: keras_cv.layers.RandomShear(x_factor=0.3)),
        ("keras_rotation", lambda: keras.layers.RandomRotation(0.2)),
    )
    def test_xla_warps_match_the_layer(self, make_layer):
        # Layers with a known projective matrix are applied by our gather-based warp;
        # the layer's own augment_images (ImageProjectiveTransformV3) is the oracle.
        layer = make_layer()
        augmentation = augment.PairedAugmentation(geometric_layers=[layer])
        self.assertTrue(augmentation.xla_compatible)
        images = _images(height=16, width=20)
        transform = augmentation.sample(BATCH, 16, 20)
        cropped = _reference_warp(images, transform)
        (layer_transformation,) = transform["layer_transformations"]
        if isinstance(layer, keras_cv.layers.VectorizedBaseImageAugmentationLayer):
            expected = layer.augment_images(cropped, transformations=layer_transformation)
        else:
            expected = layer.transform_images(cropped, layer_transformation, training=True)
        got = augmentation.apply_to_images(images, transform)
        self.assertAllClose(expected, got, atol=1e-5, rtol=0)
        self.assertNotAllClose(cropped, got, atol=1e-3)

    @parameterized.named_parameters(
        ("keras_cv_rotation", lambda: keras_cv.layers.RandomRotation(0.1, fill_mode="constant")),
        ("keras_cv_zoom", lambda: keras_cv.layers.RandomZoom(0.3, fill_mode="constant")),
        ("keras_cv_shear", lambda: keras_cv.layers.RandomShear(0.3, 0.3, fill_mode="constant")),
        ("keras_rotation", lambda: keras.layers.RandomRotation(0.1, fill_mode="constant")),
        ("keras_zoom", lambda: keras.layers.RandomZoom(0.3, fill_mode="constant")),
        (
            "keras_translation",
            lambda: keras.layers.RandomTranslation(0.2, 0.2, fill_mode="constant"),
        ),
    )
    def test_geometric_layer_pairs_images_and_heatmaps(self, make_layer):
        augmentation = augment.PairedAugmentation(geometric_layers=[make_layer()])
        images = _images()
        transform = augmentation.sample(BATCH, 16, 16)
        warped_images = augmentation.apply_to_images(images, transform)
        for channel in range(3):
            self.assertAllClose(
                warped_images[..., channel],
                augmentation.apply_to_heatmaps(images[..., channel], transform),
                atol=1e-5,
            )
        # The layer did something beyond the crop and flip.
        self.assertNotAllClose(_reference_warp(images, transform), warped_images, atol=1e-3)

    @parameterized.named_parameters(
        ("keras_zoom", lambda: keras.layers.RandomZoom(0.3)),
        ("keras_translation", lambda: keras.layers.RandomTranslation(0.2, 0.2)),
    )
    def test_layers_without_xla_path_are_reported(self, make_layer):
        layer = make_layer()
        augmentation = augment.PairedAugmentation(
            geometric_layers=[keras_cv.layers.RandomRotation(0.1), layer]
        )
        self.assertFalse(augmentation.xla_compatible)
        with self.assertRaisesRegex(ValueError, f"{type(layer).__name__} '{layer.name}'"):
            augmentation.require_xla_compatible()
        with self.assertRaisesRegex(ValueError, "jit_compile=False"):
            augmentation.require_xla_compatible()
        # The rotation has an XLA path: it is not among the offending layers.
        rotation = augmentation.geometric_layers[0]
        try:
            augmentation.require_xla_compatible()
        except ValueError as error:
            self.assertNotIn(f"'{rotation.name}'", str(error))

    @parameterized.named_parameters(
        ("default", lambda: []),
        (
            "all_xla_layers",
            lambda: [
                keras_cv.layers.RandomRotation(0.2),
                keras_cv.layers.RandomZoom(0.2),
                keras_cv.layers.RandomTranslation(0.1, 0.1),
                keras_cv.layers.RandomShear(0.2, 0.2),
                keras.layers.RandomRotation(0.2),
            ],
        ),
    )
    def test_heatmap_gradient_is_the_exact_transpose(self, make_layers):
        # For a linear map A, the gradient of <g, A x> is A^T g, so <x, grad> must equal
        # <g, A x>. ImageProjectiveTransformV3's own gradient (the inverse warp) fails
        # this by several percent; our warps pass to float precision.
        augmentation = augment.PairedAugmentation(geometric_layers=make_layers())
        heatmaps = _images(batch=4, height=16, width=16, channels=1)[..., 0]
        cotangent = tf.random.stateless_normal([4, 16, 16], seed=[5, 6])
        transform = augmentation.sample(4, 16, 16)
        with tf.GradientTape() as tape:
            tape.watch(heatmaps)
            inner = tf.reduce_sum(
                cotangent * augmentation.apply_to_heatmaps(heatmaps, transform), axis=[1, 2]
            )
        gradient = tape.gradient(inner, heatmaps)
        self.assertAllClose(inner, tf.reduce_sum(heatmaps * gradient, axis=[1, 2]), rtol=1e-5)

    @parameterized.named_parameters(
        ("keras_cv_rotation", lambda: keras_cv.layers.RandomRotation((0.125, 0.125))),
        ("keras_rotation", lambda: keras.layers.RandomRotation((0.125, 0.125))),
        ("keras_zoom", lambda: keras.layers.RandomZoom((0.5, 0.5), interpolation="nearest")),
    )
    def test_heatmaps_get_zero_fill_whatever_the_layer_fill_mode(self, make_layer):
        layer = make_layer()
        augmentation = augment.PairedAugmentation(
            area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), geometric_layers=[layer]
        )
        ones = tf.ones([BATCH, 16, 16, 1])
        transform = augmentation.sample(BATCH, 16, 16)
        # Images keep the layer's reflect fill; heatmaps get 0 where the warp reaches
        # outside the image (the corners for a 45 degree rotation or a zoom out).
        self.assertAllClose(ones, augmentation.apply_to_images(ones, transform))
        warped = augmentation.apply_to_heatmaps(ones[..., 0], transform)
        self.assertAllClose(tf.zeros([BATCH]), warped[:, 0, 0])
        self.assertAllClose(tf.ones([BATCH]), warped[:, 8, 8])
        # The user's layer is left as it was.
        self.assertEqual(layer.fill_mode, "reflect")
        self.assertEqual(layer.interpolation, make_layer().interpolation)

    def test_photometric_layers_touch_images_only(self):
        augmentation = augment.PairedAugmentation(
            area_range=(1.0, 1.0),
            aspect_ratio_range=(1.0, 1.0),
            flip_probability=0.0,
            photometric_layers=[keras.layers.RandomBrightness((0.5, 0.5), value_range=(0, 10))],
        )
        images = _images()
        transform = augmentation.sample(BATCH, 16, 16)
        self.assertAllClose(images + 5.0, augmentation.apply_to_images(images, transform))
        self.assertAllClose(
            images[..., 0], augmentation.apply_to_heatmaps(images[..., 0], transform)
        )

    def test_call(self):
        augmentation = augment.PairedAugmentation()
        images = _images()
        self.assertEqual(augmentation(images, training=True).shape, images.shape)
        self.assertNotAllClose(images, augmentation(images, training=True))
        self.assertAllEqual(images, augmentation(images, training=False))

    def test_call_with_unknown_batch_size(self):
        augmentation = augment.PairedAugmentation(
            geometric_layers=[keras_cv.layers.RandomRotation(0.1), keras.layers.RandomZoom(0.1)]
        )

        @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32)])
        def view(images):
            return augmentation(images, training=True)

        self.assertEqual(view(_images()).shape, (BATCH, 16, 16, 3))
        self.assertEqual(view(_images(batch=2)).shape, (2, 16, 16, 3))

    def test_transform_from_another_layer_is_rejected(self):
        plain = augment.PairedAugmentation()
        rotating = augment.PairedAugmentation(
            geometric_layers=[keras_cv.layers.RandomRotation(0.1)]
        )
        with self.assertRaisesRegex(ValueError, "layer_transformations"):
            rotating.apply_to_images(_images(), plain.sample(BATCH, 16, 16))

    def test_sample_is_random_and_reproducible(self):
        keras.utils.set_random_seed(7)
        augmentation = augment.PairedAugmentation()
        first = augmentation.sample(BATCH, 16, 16)
        second = augmentation.sample(BATCH, 16, 16)
        self.assertNotAllClose(first["boxes"], second["boxes"])
        keras.utils.set_random_seed(7)
        replay = augment.PairedAugmentation().sample(BATCH, 16, 16)
        self.assertAllEqual(first["boxes"], replay["boxes"])
        self.assertAllEqual(first["flips"], replay["flips"])
        seeded = [augment.PairedAugmentation(seed=5).sample(BATCH, 16, 16) for _ in range(2)]
        self.assertAllEqual(seeded[0]["boxes"], seeded[1]["boxes"])

    @parameterized.named_parameters(
        ("default", lambda: {}),
        (
            "with_layers",
            lambda: {
                "area_range": (0.2, 0.9),
                "aspect_ratio_range": (0.5, 2.0),
                "flip_probability": 0.25,
                "geometric_layers": [
                    keras_cv.layers.RandomRotation(0.1, fill_mode="constant"),
                    keras.layers.RandomZoom(0.2),
                ],
                "photometric_layers": [
                    keras_cv.layers.RandomColorJitter(
                        value_range=(0, 1),
                        brightness_factor=0.2,
                        contrast_factor=0.2,
                        saturation_factor=0.2,
                        hue_factor=0.1,
                    )
                ],
                "seed": 3,
                "crop_mode": "torchvision",
                "name": "paired",
            },
        ),
    )
    def test_get_config_round_trip(self, make_kwargs):
        augmentation = augment.PairedAugmentation(**make_kwargs())
        config = augmentation.get_config()
        restored = augment.PairedAugmentation.from_config(config)
        self.assertEqual(config, restored.get_config())
        self.assertEqual(
            [type(layer) for layer in augmentation.geometric_layers],
            [type(layer) for layer in restored.geometric_layers],
        )
        # Through Keras's generic (de)serialisation, as a model's get_config uses it.
        revived = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(augmentation)
        )
        self.assertIsInstance(revived, augment.PairedAugmentation)
        self.assertEqual(config, revived.get_config())

    @parameterized.named_parameters(
        ("area_zero", {"area_range": (0.0, 1.0)}, r"area_range.*\(0\.0, 1\.0\)"),
        ("area_reversed", {"area_range": (0.5, 0.2)}, "area_range"),
        ("area_above_one", {"area_range": (0.1, 1.5)}, "area_range"),
        ("area_not_pair", {"area_range": 0.5}, "area_range"),
        ("ratio_negative", {"aspect_ratio_range": (-1.0, 1.0)}, "aspect_ratio_range"),
        ("ratio_reversed", {"aspect_ratio_range": (2.0, 1.0)}, "aspect_ratio_range"),
        ("flip_negative", {"flip_probability": -0.1}, r"flip_probability.*\[0, 1\].*-0\.1"),
        ("flip_above_one", {"flip_probability": 1.5}, "flip_probability"),
        ("seed_string", {"seed": "abc"}, "seed"),
        ("crop_mode", {"crop_mode": "pil"}, "crop_mode.*'pil'"),
        ("geometric_not_layer", {"geometric_layers": [object()]}, r"geometric_layers\[0\]"),
        ("geometric_dense", {"geometric_layers": [keras.layers.Dense(2)]}, "Dense"),
        (
            "geometric_not_list",
            {"geometric_layers": keras_cv.layers.RandomRotation(0.1)},
            "list or tuple",
        ),
        (
            "photometric_geometric",
            {"photometric_layers": [keras_cv.layers.RandomRotation(0.1)]},
            r"photometric_layers\[0\].*geometric_layers",
        ),
    )
    def test_argument_validation(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            augment.PairedAugmentation(**kwargs)


if __name__ == "__main__":
    tf.test.main()
