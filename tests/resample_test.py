"""cgc_tf.resample: the crop/flip/resize and projective kernels against TF's ops, torch's
interpolation and PIL; their gradients; the crop parameters against torchvision's rules."""

import math

import numpy as np
from PIL import Image
import tensorflow as tf
from absl.testing import parameterized

from benchmarks import dense_resize
from cgc_tf import augment
from cgc_tf import resample

BATCH = 3


def _images(batch=BATCH, height=16, width=16, channels=3, seed=0):
    return tf.random.stateless_uniform([batch, height, width, channels], seed=[seed, 1])


class CropFlipResizeTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        ("same_size", (16, 20), (16, 20)),
        ("smaller", (16, 20), (7, 5)),
        ("single_pixel", (9, 9), (1, 1)),
        ("larger", (8, 6), (11, 13)),
    )
    def test_matches_crop_and_resize(self, input_size, output_size):
        images = _images(batch=6, height=input_size[0], width=input_size[1])
        boxes = tf.constant(
            [
                [0.0, 0.0, 1.0, 1.0],
                [0.3, 0.25, 1.0, 1.0],
                [0.1, 0.2, 0.7, 0.9],
                [-0.1, -0.2, 1.1, 1.3],  # partly outside: extrapolation value 0
                [0.8, 0.6, 0.2, 0.1],  # reversed box: crop_and_resize flips it
                [0.5, 0.5, 0.5, 0.5],
            ]
        )
        flips = tf.constant([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
        expected = tf.image.crop_and_resize(images, boxes, tf.range(6), output_size)
        expected = tf.where(
            flips[:, None, None, None] > 0, tf.image.flip_left_right(expected), expected
        )
        got = resample.crop_flip_resize(images, boxes, flips, output_size)
        self.assertAllClose(expected, got, atol=1e-6, rtol=0)

    def test_gradient_matches_crop_and_resize_gradient(self):
        images = _images(batch=4, height=12, width=10)
        boxes = tf.constant(
            [[0.0, 0.0, 1.0, 1.0], [0.2, 0.1, 0.9, 0.6], [0.1, 0.3, 0.5, 1.0], [0, 0, 0.3, 0.3]]
        )
        weights = tf.random.stateless_normal([4, 12, 10, 3], seed=[3, 4])
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(images)
            ours = tf.reduce_sum(
                weights * resample.crop_flip_resize(images, boxes, tf.zeros([4]), (12, 10))
            )
            reference = tf.reduce_sum(
                weights * tf.image.crop_and_resize(images, boxes, tf.range(4), (12, 10))
            )
        self.assertAllClose(
            tape.gradient(reference, images), tape.gradient(ours, images), atol=1e-5
        )

    @parameterized.named_parameters(
        ("same_size", (24, 32)), ("smaller", (7, 5)), ("single_pixel", (1, 1))
    )
    def test_matches_dense_formulation(self, output_size):
        # Random paper-style boxes (both flip states) and edge cases: the full image,
        # partly outside, reversed, a single point.
        uniforms = tf.random.stateless_uniform([12, 2 * resample.CROP_CANDIDATES + 3], [5, 5])
        paper = resample.continuous_boxes(uniforms, 24.0, 32.0, (0.08, 1.0), (3 / 4, 4 / 3))
        boxes = tf.concat(
            [
                paper[:8],
                [[0.0, 0.0, 1.0, 1.0], [-0.1, -0.2, 1.1, 1.3], [0.8, 0.6, 0.2, 0.1],
                 [0.5, 0.5, 0.5, 0.5]],
            ],
            axis=0,
        )
        flips = uniforms[:, -1] < 0.5
        self.assertBetween(int(tf.reduce_sum(tf.cast(flips, tf.int32))), 1, 11)
        heatmaps = _images(batch=12, height=24, width=32, channels=1)
        cotangent = tf.random.stateless_normal([12, *output_size, 1], seed=[9, 9])
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(heatmaps)
            ours = resample.crop_flip_resize(heatmaps, boxes, flips, output_size)
            dense = dense_resize.crop_flip_resize(heatmaps, boxes, flips, output_size)
            ours_inner = tf.reduce_sum(cotangent * ours)
            dense_inner = tf.reduce_sum(cotangent * dense)
        self.assertAllClose(dense, ours, atol=1e-6, rtol=0)
        # Differentiable w.r.t. the heatmaps, with the same gradient.
        self.assertAllClose(
            tape.gradient(dense_inner, heatmaps),
            tape.gradient(ours_inner, heatmaps),
            atol=1e-5,
            rtol=0,
        )

    @parameterized.named_parameters(
        ("not_a_pair", (16,)), ("float", (16.0, 16)), ("zero", (0, 16)), ("tensor", None)
    )
    def test_rejects_bad_output_size(self, output_size):
        if output_size is None:
            output_size = tf.constant([16, 16])
        with self.assertRaisesRegex(ValueError, "output_size"):
            resample.crop_flip_resize(
                _images(), tf.zeros([BATCH, 4]), tf.zeros([BATCH]), output_size
            )


def _torch_resized_crop(images, crops, flips, output_size):
    """numpy transcription of F.interpolate(image[i:i+h, j:j+w], bilinear,
    align_corners=False) + flip, per example (torch's upsample_bilinear2d)."""

    def taps(length, size):
        # float32 source coordinates, as torch's kernel computes them.
        scale = np.float32(length) / np.float32(size)
        positions = np.arange(size, dtype=np.float32) + np.float32(0.5)
        source = np.maximum(scale * positions - np.float32(0.5), np.float32(0.0))
        lower = np.minimum(np.floor(source).astype(int), length - 1)
        upper = np.minimum(lower + 1, length - 1)
        return lower, upper, source - np.floor(source)

    outputs = []
    for image, (top, left, height, width), flip in zip(images, crops, flips):
        crop = image[top : top + height, left : left + width].astype(np.float64)
        lower, upper, fraction = taps(height, output_size[0])
        rows = (1 - fraction)[:, None, None] * crop[lower] + fraction[:, None, None] * crop[upper]
        lower, upper, fraction = taps(width, output_size[1])
        out = (1 - fraction)[None, :, None] * rows[:, lower] + fraction[None, :, None] * rows[:, upper]
        outputs.append(out[:, ::-1] if flip else out)
    return np.stack(outputs)


class ResizedCropTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        ("same_size", (16, 20)), ("smaller", (7, 5)), ("larger", (31, 27)), ("one", (1, 1))
    )
    def test_matches_torch_interpolate_of_the_crop(self, output_size):
        images = _images(batch=5, height=16, width=20).numpy()
        crops = np.array(
            [[0, 0, 16, 20], [3, 2, 9, 7], [5, 4, 1, 1], [0, 10, 16, 10], [12, 0, 4, 20]]
        )
        flips = np.array([False, True, False, True, True])
        got = resample.resized_crop(images, crops, flips, output_size)
        expected = _torch_resized_crop(images, crops, flips, output_size)
        self.assertAllClose(expected, got, atol=1e-6, rtol=0)

    def test_images_match_pil_resized_crop_up_to_rounding(self):
        # The reference makes x_aug with torchvision's resized_crop of a PIL image
        # (crop, then Image.resize bilinear): T's crops never exceed the image, so it
        # always upsamples, where PIL's bilinear filter is torch's up to uint8 rounding.
        image = (255 * _images(batch=1, height=40, width=36)[0]).numpy().astype(np.uint8)
        crops = [[0, 0, 40, 36], [3, 5, 20, 17], [10, 0, 30, 36], [0, 20, 9, 16]]
        for top, left, height, width in crops:
            pil = Image.fromarray(image).crop((left, top, left + width, top + height))
            expected = np.asarray(pil.resize((36, 40), Image.BILINEAR), np.float32)
            got = resample.resized_crop(
                image[None].astype(np.float32), [[top, left, height, width]], [False], (40, 36)
            )[0]
            self.assertLessEqual(float(tf.reduce_max(tf.abs(got - expected))), 1.0 + 1e-4)

    def test_gradient_is_the_transpose(self):
        images = _images(batch=2, height=12, width=10, channels=1)
        crops = tf.constant([[2, 1, 6, 7], [0, 0, 12, 10]])
        cotangent = tf.random.stateless_normal([2, 12, 10, 1], seed=[1, 2])
        with tf.GradientTape() as tape:
            tape.watch(images)
            inner = tf.reduce_sum(cotangent * resample.resized_crop(images, crops, [1, 0], (12, 10)))
        gradient = tape.gradient(inner, images)
        # Linear map: <A x, c> = <x, A^T c> for the gradient A^T c.
        self.assertAllClose(inner, tf.reduce_sum(gradient * images), rtol=1e-5)

    def test_torchvision_mode_warps_images_and_heatmaps_alike(self):
        augmentation = augment.PairedAugmentation(crop_mode="torchvision", seed=1)
        images = _images(batch=4, height=16, width=16, channels=1)
        transform = augmentation.sample(4, 16, 16)
        expected = _torch_resized_crop(
            images.numpy(), transform["crops"].numpy(), transform["flips"].numpy(), (16, 16)
        )
        self.assertAllClose(expected, augmentation.apply_to_images(images, transform), atol=1e-6)
        self.assertAllClose(
            expected[..., 0], augmentation.apply_to_heatmaps(images[..., 0], transform), atol=1e-6
        )
        with self.assertRaisesRegex(ValueError, "'crops'"):
            augmentation.apply_to_images(images, augment.PairedAugmentation().sample(4, 16, 16))


class ProjectiveTransformTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.product(
        fill_mode=["constant", "nearest", "reflect", "wrap"],
        interpolation=["bilinear", "nearest"],
        fill_value=[0.0, 0.7],
    )
    def test_matches_image_projective_transform_v3(self, fill_mode, interpolation, fill_value):
        images = _images(batch=4, height=13, width=17, channels=2)
        # Rotations, large shifts and perspective terms reach far outside the image.
        scale = tf.constant([2.0, 2.0, 30.0, 2.0, 2.0, 30.0, 0.05, 0.05])
        transforms = tf.random.stateless_uniform([4, 8], seed=[7, 8], minval=-1.0) * scale
        expected = tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=transforms,
            output_shape=[13, 17],
            fill_value=fill_value,
            fill_mode=fill_mode.upper(),
            interpolation=interpolation.upper(),
        )
        got = resample.projective_transform(
            images, transforms, fill_mode, fill_value, interpolation
        )
        self.assertAllClose(expected, got, atol=1e-5, rtol=0)


def _get_params(uniforms, height, width, area_range, ratio_range):
    """torchvision's RandomResizedCrop.get_params, transcribed, with its random draws
    replaced by the rows of `uniforms` (float32 arithmetic as resample's)."""
    count = resample.CROP_CANDIDATES
    f32 = np.float32
    crops = []
    for row in uniforms.astype(np.float32):
        for k in range(count):
            area = f32(height) * f32(width) * (
                f32(area_range[0]) + f32(area_range[1] - area_range[0]) * row[k])
            log_low, log_high = f32(math.log(ratio_range[0])), f32(math.log(ratio_range[1]))
            ratio = np.exp(log_low + (log_high - log_low) * row[count + k])
            w = int(np.round(np.sqrt(area * ratio)))
            h = int(np.round(np.sqrt(area / ratio)))
            if 0 < w <= width and 0 < h <= height:
                # torch.randint(0, side - crop + 1) from a uniform draw.
                i = min(int(np.floor(row[2 * count] * f32(height - h + 1))), height - h)
                j = min(int(np.floor(row[2 * count + 1] * f32(width - w + 1))), width - w)
                crops.append((i, j, h, w))
                break
        else:
            in_ratio = width / height
            w, h = width, height
            if in_ratio < min(ratio_range):
                h = int(round(w / min(ratio_range)))
            elif in_ratio > max(ratio_range):
                w = int(round(h * max(ratio_range)))
            crops.append(((height - h) // 2, (width - w) // 2, h, w))
    return np.array(crops)


class CropParametersTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        ("paper", 24, 32, (0.08, 1.0), (3 / 4, 4 / 3)),
        # Large square crops of a wide image: most rows fall back to the central crop.
        ("wide_fallback", 8, 40, (0.5, 1.0), (0.9, 1.1)),
        ("tall_fallback", 40, 8, (0.5, 1.0), (0.9, 1.1)),
    )
    def test_torchvision_crops_follow_get_params(self, height, width, area_range, ratio_range):
        uniforms = tf.random.stateless_uniform([300, 2 * resample.CROP_CANDIDATES + 3], [3, 4])
        got = resample.torchvision_crops(uniforms, height, width, area_range, ratio_range)
        expected = _get_params(uniforms.numpy(), height, width, area_range, ratio_range)
        self.assertEqual(got.dtype, tf.int32)
        self.assertAllEqual(expected, got)

    def test_continuous_boxes_by_hand(self):
        count = resample.CROP_CANDIDATES
        uniforms = np.full([2, 2 * count + 3], 0.5, np.float32)
        # The first candidate fits: area 0.08 + 0.92 * 0.25, the log-ratio midway
        # between log(3/4) and log(4/3) (ratio 1), offsets 0.2 and 0.6.
        uniforms[:, 0], uniforms[:, 2 * count : 2 * count + 2] = 0.25, (0.2, 0.6)
        boxes = resample.continuous_boxes(
            tf.constant(uniforms), 24.0, 32.0, (0.08, 1.0), (3 / 4, 4 / 3)
        ).numpy()
        area = 0.08 + 0.92 * 0.25
        box_height, box_width = boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]
        self.assertAllClose(box_height * box_width, area, atol=1e-6)
        self.assertAllClose(box_width * 32.0 / (box_height * 24.0), 1.0, atol=1e-5)
        self.assertAllClose(boxes[0, :2], [0.2 * (1 - box_height), 0.6 * (1 - box_width)], atol=1e-6)
        fallback = resample.continuous_boxes(
            tf.constant(uniforms), 16.0, 32.0, (1.0, 1.0), (1.0, 1.0)
        ).numpy()
        # A square covering the whole 16x32 image cannot exist: the central 16x16 crop.
        self.assertAllClose(fallback, [[0.0, 0.25, 1.0, 0.75]] * 2, atol=1e-6)
