"""Exported signatures under bad inputs: wrong shapes/dtypes, NaN/Inf, undecodable bytes.

One 32x32 model is exported once (SavedModel only) and loaded once; every test
calls the loaded signatures, as a server would.
"""

import atexit
import os
import shutil
import tempfile

import hypothesis
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized
from hypothesis import strategies as st

import cgc_tf
from cgc_tf import export
from cgc_tf import export_verification as verification
from cgc_tf.data import decode as data_decode
from cgc_tf.data import views as data_views
from tests import testing_models

IMAGE_SIZE = 32
NUM_CLASSES = 3
# One export shared by the test classes (a test-only cache: exporting takes seconds).
_SHARED = {}


def _shared_export():
    """(model, loaded SavedModel), exported once for the whole file."""
    if not _SHARED:
        root = tempfile.mkdtemp(prefix="cgc_serving_test_")
        atexit.register(shutil.rmtree, root, True)
        backbone = testing_models.tiny_convnet(image_size=IMAGE_SIZE, num_classes=NUM_CLASSES)
        model = cgc_tf.CGCModel(backbone, target_layer="features")
        export.export_model(model, root, formats=("saved_model",))
        _SHARED.update(model=model, loaded=tf.saved_model.load(os.path.join(root, "1")))
    return _SHARED["model"], _SHARED["loaded"]


class _LoadedModelTestCase(tf.test.TestCase, parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.model, self.loaded = _shared_export()

    def signature(self, name):
        return self.loaded.signatures[name]

    def reference(self, images, class_index=None):
        outputs = self.model.explain(images, class_index)
        return {name: value.numpy() for name, value in outputs.items()}

    def assertMatchesReference(self, outputs, expected, rows=None):
        rows = slice(None) if rows is None else rows
        self.assertAllClose(outputs["probabilities"][rows], expected["probabilities"], atol=1e-5)
        self.assertAllEqual(outputs["class_id"][rows], expected["class_id"])
        scale = max(float(np.max(expected["heatmap"])), verification.HEATMAP_SCALE_FLOOR)
        self.assertAllClose(
            outputs["heatmap"][rows], expected["heatmap"], atol=1e-4 * scale, rtol=0
        )


class FloatSignatureTest(_LoadedModelTestCase):
    @parameterized.named_parameters(
        ("rank_3", [2, 8, 8], r"images must be float32 \[batch, height, width, 3\].*\[2 8 8\]"),
        ("rank_3_rgb", [8, 8, 3], r"images \[8,8,3\] is not compatible with .* \[\?,\?,\?,3\]"),
        ("rank_5", [1, 2, 8, 8, 3], r"images \[1,2,8,8,3\] is not compatible"),
        ("one_channel", [2, 8, 8, 1], r"images must be float32 \[batch, height, width, 3\].*1\]"),
        ("four_channels", [2, 8, 8, 4], r"3\]\ \(RGB in \[0, 1\]\); got shape\] \[2 8 8 4\]"),
        ("empty_batch", [0, 8, 8, 3], r"at least one image of at least 1x1 pixels.*\[0 8 8 3\]"),
        ("empty_image", [2, 0, 8, 3], r"at least one image of at least 1x1 pixels.*\[2 0 8 3\]"),
    )
    def test_wrong_shapes_are_rejected_with_a_clear_message(self, shape, message):
        for name in ("serving_default", "explain"):
            with self.assertRaisesRegex(tf.errors.InvalidArgumentError, message):
                self.signature(name)(images=tf.zeros(shape))

    @parameterized.parameters(tf.int32, tf.float64, tf.uint8, tf.string)
    def test_wrong_dtypes_are_rejected(self, dtype):
        images = tf.zeros([1, 8, 8, 3], dtype) if dtype != tf.string else tf.fill([1, 8, 8, 3], "x")
        with self.assertRaisesRegex(
            tf.errors.InvalidArgumentError, r"expected to be a float tensor but is a"
        ):
            self.signature("explain")(images=images)

    def test_class_index_is_checked(self):
        images = tf.zeros([2, IMAGE_SIZE, IMAGE_SIZE, 3])
        with self.assertRaisesRegex(
            tf.errors.InvalidArgumentError,
            r"class_index must be -1 .* or in \[0, 3\); got\] \[0 3\]",
        ):
            self.signature("explain_class")(images=images, class_index=tf.constant([0, 3]))
        with self.assertRaisesRegex(
            tf.errors.InvalidArgumentError,
            r"class_index must have one entry per image.*\[1\] \[2\]",
        ):
            self.signature("explain_class")(images=images, class_index=tf.constant([-1]))
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, r"class_index must be -1"):
            self.signature("explain_bytes_class")(
                image_bytes=tf.constant([b"x"]), class_index=tf.constant([-2])
            )

    def test_nan_and_inf_pixels_are_sanitised(self):
        images = np.random.default_rng(0).random((3, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
        corrupted = images.copy()
        corrupted[0, :5] = np.nan
        corrupted[1, 3:9, 2] = np.inf
        corrupted[2, -4:] = -np.inf
        corrupted[2, 0, 0] = 7.0
        expected_images = np.nan_to_num(corrupted, nan=0.0, posinf=1.0, neginf=0.0).clip(0, 1)
        outputs = self.signature("explain")(images=tf.constant(corrupted))
        outputs = {name: value.numpy() for name, value in outputs.items()}
        for value in outputs.values():
            self.assertTrue(np.all(np.isfinite(value)))
        self.assertMatchesReference(outputs, self.reference(expected_images))

    def test_all_nan_batch_gives_finite_outputs(self):
        images = tf.fill([2, 20, 12, 3], float("nan"))
        outputs = self.signature("explain")(images=images)
        self.assertEqual(outputs["heatmap"].shape, (2, 20, 12))
        for value in outputs.values():
            self.assertTrue(np.all(np.isfinite(value.numpy())))


def _evaluation_view(encoded):
    """The eval pipeline's decoding and deterministic view (cgc_tf.data.pipeline)."""
    minimum = data_views.min_decoded_side(IMAGE_SIZE, classification_view=False)
    image = data_decode.decode_image(encoded, min_short_side=minimum)
    return data_views.deterministic_view(image, IMAGE_SIZE)


def _encode(seed, height, width, image_format):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if image_format == "png":
        return tf.io.encode_png(pixels).numpy()
    return tf.io.encode_jpeg(pixels).numpy()


_SIZES = st.integers(1, 40)
_FORMATS = st.sampled_from(["png", "jpeg"])
_SEEDS = st.integers(0, 2**16)
# Every element is (kind, bytes); kind says what the signature must report.
_INTACT = st.builds(
    lambda *args: ("intact", _encode(*args)), _SEEDS, _SIZES, _SIZES, _FORMATS
)
_TRUNCATED = st.builds(
    lambda data, fraction: ("truncated", data[: int(fraction * (len(data) - 1))]),
    _INTACT.map(lambda element: element[1]),
    st.floats(0.0, 1.0),
)
_CORRUPTED = st.builds(
    lambda data, position, value: (
        "unknown",
        data[: position % len(data)] + bytes([value]) + data[position % len(data) + 1 :],
    ),
    _INTACT.map(lambda element: element[1]),
    st.integers(0, 10_000),
    st.integers(0, 255),
)
_RANDOM = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda data: b"\x89PNG\r\n\x1a\n" + data),
    st.binary(max_size=200).map(lambda data: b"\xff\xd8\xff" + data),
).map(lambda data: ("unknown", data))
_ELEMENTS = st.one_of(_INTACT, _TRUNCATED, _CORRUPTED, _RANDOM)


class BytesSignatureTest(_LoadedModelTestCase):
    def _decoded_reference(self, data):
        """Keras explain of the evaluation pipeline's view of one encoded image."""
        return self.reference(_evaluation_view(data)[None])

    @pytest.mark.slow
    @hypothesis.settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @hypothesis.given(st.lists(_ELEMENTS, min_size=1, max_size=4))
    def test_bad_elements_do_not_affect_good_ones(self, elements):
        outputs = self.signature("explain_bytes")(image_bytes=tf.constant([d for _, d in elements]))
        outputs = {name: value.numpy() for name, value in outputs.items()}
        batch_size = len(elements)
        self.assertEqual(outputs["probabilities"].shape, (batch_size, NUM_CLASSES))
        self.assertEqual(outputs["heatmap"].shape, (batch_size, IMAGE_SIZE, IMAGE_SIZE))
        self.assertEqual(outputs["class_id"].shape, (batch_size,))
        for value in outputs.values():
            self.assertTrue(np.all(np.isfinite(value)))
        for row, (kind, data) in enumerate(elements):
            if kind == "intact":
                self.assertTrue(outputs["valid"][row])
            elif kind == "truncated":
                # TensorFlow's PNG and JPEG decoders reject every strict prefix.
                self.assertFalse(outputs["valid"][row])
            if outputs["valid"][row]:
                self.assertMatchesReference(outputs, self._decoded_reference(data), rows=[row])
            else:
                self.assertEqual(outputs["class_id"][row], -1)
                self.assertAllEqual(outputs["probabilities"][row], np.zeros(NUM_CLASSES))
                self.assertAllEqual(outputs["heatmap"][row], np.zeros([IMAGE_SIZE, IMAGE_SIZE]))

    def test_empty_and_all_invalid_batches(self):
        outputs = self.signature("serving_bytes")(image_bytes=tf.constant([], tf.string))
        self.assertEqual(outputs["probabilities"].shape, (0, NUM_CLASSES))
        outputs = self.signature("explain_bytes")(image_bytes=tf.constant([b"", b"\x00" * 10]))
        self.assertAllEqual(outputs["valid"], [False, False])
        self.assertAllEqual(outputs["class_id"], [-1, -1])

    def test_explain_bytes_class_maps_classes_to_valid_elements(self):
        good = [_encode(1, 40, 30, "png"), _encode(2, 17, 33, "jpeg")]
        outputs = self.signature("explain_bytes_class")(
            image_bytes=tf.constant([b"bad", good[0], good[1]]),
            class_index=tf.constant([2, 1, -1]),
        )
        outputs = {name: value.numpy() for name, value in outputs.items()}
        self.assertAllEqual(outputs["valid"], [False, True, True])
        views = tf.stack([_evaluation_view(data) for data in good])
        predicted = self.reference(views)["class_id"]
        expected = self.reference(views, np.array([1, predicted[1]], np.int32))
        self.assertMatchesReference(outputs, expected, rows=[1, 2])

    def test_large_jpeg_gets_the_evaluation_pipeline_pixels(self):
        # 300 x 400: the evaluation pipeline decodes this JPEG with libjpeg's 1/8
        # DCT downscaling (short side 37 = round(32 * 256 / 224)), then crops.
        rows = np.linspace(0, 255, 300)[:, None, None]
        columns = np.linspace(0, 255, 400)[None, :, None]
        pixels = np.broadcast_to((rows + columns) / 2, (300, 400, 3)).astype(np.uint8)
        encoded = tf.io.encode_jpeg(pixels).numpy()
        outputs = self.signature("explain_bytes")(image_bytes=tf.constant([encoded]))
        outputs = {name: value.numpy() for name, value in outputs.items()}
        self.assertTrue(outputs["valid"][0])
        self.assertMatchesReference(outputs, self._decoded_reference(encoded))


if __name__ == "__main__":
    tf.test.main()
