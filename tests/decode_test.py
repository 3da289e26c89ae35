"""Robust decoding and the corrupt-file policy (cgc_tf/data/decode.py docstring)."""

import io
import os
from unittest import mock

import numpy as np
from PIL import Image
import tensorflow as tf

from cgc_tf import data
from cgc_tf.data import decode
from cgc_tf.data import views
from tests.testing_base import temporary_directory as _temporary_directory


def _encode(array, image_format, mode=None, **options):
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _colour(height=20, width=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(content)
    return path


class DecodeImageTest(tf.test.TestCase):
    def test_grayscale_becomes_three_equal_channels(self):
        gray = np.arange(400, dtype=np.uint8).reshape(20, 20)
        for image_format in ("PNG", "BMP", "GIF"):
            image = decode.decode_image(_encode(gray, image_format)).numpy()
            self.assertEqual(image.shape, (20, 20, 3))
            for channel in range(3):
                self.assertAllEqual(image[..., channel], gray, msg=image_format)

    def test_rgba_drops_alpha_and_keeps_colours(self):
        rgba = np.zeros((6, 6, 4), np.uint8)
        rgba[..., 0], rgba[..., 1], rgba[..., 2] = 10, 200, 30
        rgba[:3, :, 3] = 0  # Fully transparent rows keep their stored colour.
        rgba[3:, :, 3] = 255
        image = decode.decode_image(_encode(rgba, "PNG")).numpy()
        self.assertEqual(image.shape, (6, 6, 3))
        self.assertAllEqual(image, np.broadcast_to([10, 200, 30], (6, 6, 3)))

    def test_cmyk_jpeg_is_converted_like_pil(self):
        rows, columns = np.mgrid[0:24, 0:24]
        rgb = np.stack([rows * 10, columns * 10, 240 - rows * 5], -1).astype(np.uint8)
        encoded = _encode(rgb, "JPEG", mode="CMYK", quality=95)
        self.assertEqual(Image.open(io.BytesIO(encoded)).mode, "CMYK")
        expected = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"), np.int32)
        image = decode.decode_image(encoded).numpy().astype(np.int32)
        self.assertEqual(image.shape, (24, 24, 3))
        self.assertLessEqual(np.abs(image - expected).max(), 1)
        self.assertLess(np.abs(image - rgb.astype(np.int32)).mean(), 3.0)

    def test_jpeg_pixels_match_pil(self):
        encoded = _encode(_colour(16, 16), "JPEG", quality=90)
        expected = np.asarray(Image.open(io.BytesIO(encoded)), np.int32)
        image = decode.decode_image(encoded).numpy().astype(np.int32)
        self.assertLessEqual(np.abs(image - expected).max(), 1)

    def test_sixteen_bit_png_is_scaled_not_clipped(self):
        values = np.array([[0, 32768, 65535, 1000]], np.uint16)
        rgb16 = np.repeat(values[..., None], 3, axis=-1)
        gray16 = Image.fromarray(values.astype(np.uint16))
        buffer = io.BytesIO()
        gray16.save(buffer, "PNG")
        for encoded in (tf.io.encode_png(rgb16).numpy(), buffer.getvalue()):
            image = decode.decode_image(encoded).numpy().astype(np.int32)
            self.assertAllEqual(image[0, :, 0], values[0] // 256)
            self.assertAllEqual(image[..., 0], image[..., 2])
        view = views.deterministic_view(
            decode.decode_image(tf.io.encode_png(np.full((8, 8, 3), 50000, np.uint16))), 8
        )
        self.assertAllClose(view, tf.fill([8, 8, 3], 50000 / 65535), atol=1 / 255)

    def test_other_formats(self):
        rgb = _colour(12, 10)
        for image_format in ("BMP", "WEBP", "GIF"):
            options = {"lossless": True} if image_format == "WEBP" else {}
            image = decode.decode_image(_encode(rgb, image_format, **options)).numpy()
            self.assertEqual(image.shape, (12, 10, 3), msg=image_format)
            if image_format != "GIF":  # GIF is palettised: colours are approximated.
                self.assertAllEqual(image, rgb, msg=image_format)

    def test_tiny_image_is_upscaled_by_both_views(self):
        image = decode.decode_image(_encode(_colour(3, 5), "PNG"))
        self.assertEqual(views.deterministic_view(image, 16).shape, (16, 16, 3))
        crop = views.classification_view(image, 16, tf.constant([1, 2]))
        self.assertEqual(crop.shape, (16, 16, 3))
        self.assertBetween(float(tf.reduce_min(crop)), 0.0, 1.0)

    def test_huge_jpeg_is_decoded_downscaled_only_when_allowed(self):
        smooth = np.empty((3000, 4000, 3), np.uint8)
        smooth[..., 0] = np.linspace(0, 255, 3000).astype(np.uint8)[:, None]
        smooth[..., 1] = np.linspace(0, 255, 4000).astype(np.uint8)[None, :]
        smooth[..., 2] = 128
        encoded = _encode(smooth, "JPEG", quality=90)
        full = decode.decode_image(encoded)
        self.assertEqual(full.shape, (3000, 4000, 3))
        # The deterministic view of S=16 needs a short side of 18: ratio 8 (375 rows).
        small = decode.decode_image(encoded, min_short_side=views.resize_side(16))
        self.assertEqual(small.shape, (375, 500, 3))
        self.assertEqual(decode.decode_image(encoded, min_short_side=1000).shape, (1500, 2000, 3))
        self.assertAllClose(
            views.deterministic_view(small, 16), views.deterministic_view(full, 16), atol=0.03
        )

    def test_try_decode_flags_bad_bytes(self):
        good = _encode(_colour(), "JPEG")
        for encoded, expected in ((good, True), (good[: len(good) // 2], False), (b"text", False)):
            image, ok = decode.try_decode(encoded=encoded)
            self.assertEqual(bool(ok), expected)
            if not expected:
                self.assertEqual(image.shape, (0, 0, 3))


class CorruptFilesTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.root = _temporary_directory(self)
        jpeg = _encode(_colour(), "JPEG")
        png = _encode(_colour(seed=1), "PNG")
        self.good = [
            _write(os.path.join(self.root, "train", "a", f"{i}.jpg"), jpeg) for i in range(3)
        ] + [_write(os.path.join(self.root, "train", "b", f"{i}.png"), png) for i in range(3)]
        self.truncated_jpeg = _write(
            os.path.join(self.root, "train", "a", "truncated.jpg"), jpeg[: len(jpeg) // 2]
        )
        self.truncated_png = _write(
            os.path.join(self.root, "train", "b", "truncated.png"), png[: len(png) // 2]
        )
        self.text_as_jpeg = _write(os.path.join(self.root, "train", "b", "notes.jpg"), b"hello")
        self.empty = _write(os.path.join(self.root, "train", "b", "empty.png"), b"")
        self.dangling = os.path.join(self.root, "train", "a", "gone.jpg")
        os.symlink(os.path.join(self.root, "missing.jpg"), self.dangling)
        self.corrupt = {
            self.truncated_jpeg, self.truncated_png, self.text_as_jpeg, self.empty, self.dangling,
        }

    def test_validation_reasons(self):
        problems, shapes = decode.validate_files(self.good + sorted(self.corrupt), full_decode=True)
        self.assertEqual(set(problems), self.corrupt)
        self.assertEqual(problems[self.dangling], "dangling symlink")
        self.assertEqual(problems[self.empty], "empty file")
        self.assertIn("not a JPEG", problems[self.text_as_jpeg])
        self.assertIn("decoding failed", problems[self.truncated_jpeg])
        self.assertEqual(set(shapes), set(self.good))
        self.assertEqual(shapes[self.good[0]], (20, 20))
        header_only, _ = decode.validate_files(sorted(self.corrupt), full_decode=False)
        self.assertEqual(set(header_only), {self.text_as_jpeg, self.empty, self.dangling})

    def test_fail_fast_names_the_files(self):
        with self.assertRaisesRegex(ValueError, "5 corrupt image file") as context:
            data.train_dataset(f"folder:{self.root}", 2, 16)
        for path in self.corrupt:
            self.assertIn(path, str(context.exception))
        self.assertIn("skip_corrupt_images=True", str(context.exception))

    def test_skip_counts_corrupt_files_before_the_first_epoch(self):
        counter = data.CorruptImageCounter()
        with self.assertLogs("absl", level="WARNING") as logs:
            dataset = data.train_dataset(
                f"folder:{self.root}", 2, 16, skip_corrupt_images=True,
                corrupt_image_counter=counter,
            )
        self.assertIn("Skipping 5 corrupt", "\n".join(logs.output))
        self.assertEqual(counter.count, 5)
        self.assertEqual(counter.names(), sorted(self.corrupt))
        labels = np.concatenate([y.numpy() for _, y in dataset])
        self.assertAllEqual(np.sort(labels), [0, 0, 0, 1, 1, 1])

    def test_in_graph_failure_names_the_file(self):
        # Above the full-validation size only headers are checked: truncated files
        # reach the graph.
        for path in (self.text_as_jpeg, self.empty, self.dangling, self.truncated_png):
            os.remove(path)
        with mock.patch.object(decode, "FULL_VALIDATION_MAX_BYTES", 0):
            dataset = data.train_dataset(f"folder:{self.root}", 7, 16)
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "truncated.jpg"):
            for _ in dataset:
                pass

    def test_in_graph_skip_is_counted_once_after_each_epoch(self):
        for path in (self.text_as_jpeg, self.empty, self.dangling):
            os.remove(path)
        counter = data.CorruptImageCounter()
        with mock.patch.object(decode, "FULL_VALIDATION_MAX_BYTES", 0):
            dataset = data.train_dataset(
                f"folder:{self.root}", 1, 16, skip_corrupt_images=True,
                corrupt_image_counter=counter,
            )
        self.assertEqual(counter.count, 0)
        for _ in range(2):
            self.assertLen(list(dataset), 6)
            self.assertEqual(counter.names(), sorted([self.truncated_jpeg, self.truncated_png]))

    def test_decode_or_fail_and_skip_in_a_map(self):
        paths = tf.constant([self.good[0], self.truncated_jpeg])
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "truncated.jpg"):
            list(tf.data.Dataset.from_tensor_slices(paths).map(decode.decode_or_fail))
        counter = decode.CorruptImageCounter()
        flags = tf.data.Dataset.from_tensor_slices(paths).map(
            lambda path: decode.decode_or_skip(path, counter)[1]
        )
        self.assertAllEqual(list(flags.as_numpy_iterator()), [True, False])
        self.assertEqual(counter.names(), [self.truncated_jpeg])

    def test_unreadable_file_is_corrupt(self):
        path = self.good[0]
        os.chmod(path, 0)
        self.addCleanup(os.chmod, path, 0o644)
        try:
            open(path, "rb").close()
        except PermissionError:
            self.assertStartsWith(decode.check_file(path), "unreadable")
        else:
            self.skipTest("running as root: chmod 000 does not block reads")


class FolderListingTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.root = _temporary_directory(self)
        self.png = _encode(_colour(), "PNG")
        for split, classes in (("train", "abc"), ("val", "ac")):
            for name in classes:
                for i in range(2):
                    _write(os.path.join(self.root, split, name, f"{i}.png"), self.png)

    def test_non_image_files_are_ignored_with_a_warning(self):
        _write(os.path.join(self.root, "train", "a", "readme.txt"), b"notes")
        _write(os.path.join(self.root, "train", "a", ".DS_Store"), b"\0\0")
        _write(os.path.join(self.root, "train", "b", "UPPER.PNG"), self.png)
        with self.assertLogs("absl", level="WARNING") as logs:
            info = data.dataset_info(f"folder:{self.root}")
        self.assertEqual(info.splits, {"train": 7, "val": 4})
        self.assertIn(".txt: 1", "\n".join(logs.output))
        self.assertIn(".DS_Store: 1", "\n".join(logs.output))

    def test_empty_train_class_folder_is_an_error_naming_it(self):
        os.makedirs(os.path.join(self.root, "train", "d"))
        with self.assertRaisesRegex(ValueError, r"without image files.*train/d"):
            data.dataset_info(f"folder:{self.root}")

    def test_empty_eval_class_folder_is_a_warning(self):
        os.makedirs(os.path.join(self.root, "val", "b"))
        with self.assertLogs("absl", level="WARNING") as logs:
            info = data.dataset_info(f"folder:{self.root}")
        self.assertIn("val/b", "\n".join(logs.output))
        self.assertEqual(info.splits["val"], 4)

    def test_eval_class_absent_from_train_is_an_error_naming_it(self):
        _write(os.path.join(self.root, "val", "zebra", "0.png"), self.png)
        with self.assertRaisesRegex(ValueError, "zebra"):
            data.dataset_info(f"folder:{self.root}")

    def test_symlinked_files_and_class_folders_are_followed(self):
        elsewhere = _temporary_directory(self)
        _write(os.path.join(elsewhere, "d", "0.png"), self.png)
        target = _write(os.path.join(elsewhere, "1.png"), self.png)
        os.symlink(os.path.join(elsewhere, "d"), os.path.join(self.root, "train", "d"))
        os.symlink(target, os.path.join(self.root, "train", "a", "linked.png"))
        info = data.dataset_info(f"folder:{self.root}")
        self.assertEqual(info.class_names, ("a", "b", "c", "d"))
        self.assertEqual(info.splits["train"], 8)
        _, labels = next(iter(data.eval_dataset(f"folder:{self.root}", 8, 16, split="train")))
        self.assertAllEqual(labels, [0, 0, 0, 1, 1, 2, 2, 3])


if __name__ == "__main__":
    tf.test.main()
