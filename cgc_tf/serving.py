"""Serving functions of an exported `CGCModel`: preprocessing, predictions, heatmaps.

`ServingFunctions(model)` holds plain Python functions; `cgc_tf.export` wraps them in
`tf.function`s with explicit input signatures (SavedModel) and converts the float one
to ONNX. Outputs: probabilities float32 [B, K], class_id int32 [B] (-1 for undecodable
bytes), heatmap float32 [B, H, W] (as `CGCModel.explain`), valid bool [B] (bytes
inputs). Inputs: images float32 [B, H, W, 3] in [0, 1] or image_bytes string [B];
their preprocessing is `PREPROCESSING` (recorded in each export's metadata). The
contract and bad inputs in full: docs/export.md.
"""

import tensorflow as tf

from cgc_tf import gradcam as gradcam_lib
from cgc_tf.data import decode as data_decode
from cgc_tf.data import views as data_views

IMAGES_KEY = "images"
IMAGE_BYTES_KEY = "image_bytes"
CLASS_INDEX_KEY = "class_index"
# The SavedModel signature (no inputs) returning the export metadata as JSON.
METADATA_SIGNATURE = "metadata"
# Entries of a tensor shown in an assertion message.
MAX_SHOWN = 16
# The preprocessing contract of the inputs, as exports record it in their metadata.
PREPROCESSING = {
    IMAGES_KEY: (
        "float32 [B, H, W, 3] RGB in [0, 1]; NaN -> 0, then clipped to [0, 1]; resized "
        "bilinearly (no antialiasing, aspect not kept) to image_size x image_size when H, W "
        "differ; heatmap returned at H x W"
    ),
    IMAGE_BYTES_KEY: (
        "string [B] of encoded JPEG/PNG (GIF/BMP/WebP also decode); decoded to RGB as the "
        "evaluation pipeline does (JPEG: accurate IDCT, DCT downscaling down to the view's "
        "short side), short side resized to round(image_size * 256 / 224) (bilinear, "
        "antialiased), centre crop image_size x image_size, scaled to [0, 1]; heatmap over "
        "that crop; undecodable elements give valid=false, class_id=-1, zero probabilities "
        "and heatmap"
    ),
    CLASS_INDEX_KEY: "int32 [B]: class to explain per image, -1 = the predicted class",
}


def float_spec(batch_size=None, channels=None):
    """TensorSpec of the float image input: float32 [batch_size, None, None, channels].

    The SavedModel leaves the channel count dynamic so that the in-graph check
    reports a wrong count by name; ONNX declares 3 so onnxruntime rejects others.
    """
    return tf.TensorSpec([batch_size, None, None, channels], tf.float32, name=IMAGES_KEY)


def bytes_spec():
    """TensorSpec of the encoded image input: string [B]."""
    return tf.TensorSpec([None], tf.string, name=IMAGE_BYTES_KEY)


def class_index_spec(batch_size=None):
    """TensorSpec of the requested class: int32 [B], -1 = the predicted class."""
    return tf.TensorSpec([batch_size], tf.int32, name=CLASS_INDEX_KEY)


def preprocess_encoded(encoded, image_size):
    """Decodes one encoded image into the evaluation view; raises on corrupt data.

    The same functions as the evaluation pipeline (`cgc_tf.data.pipeline`), so a
    served image sees exactly the pixels of training's deterministic view:
    `cgc_tf.data.decode.decode_image` (JPEGs with libjpeg's accurate IDCT and
    DCT downscaling down to the view's short side, grayscale replicated, alpha
    dropped), then `cgc_tf.data.views.deterministic_view`.

    Args:
      encoded: scalar string tensor, a JPEG/PNG/GIF/BMP/WebP file.
      image_size: S, the model's input side.

    Returns:
      float32 [S, S, 3] in [0, 1].

    Raises:
      tf.errors.InvalidArgumentError: (when run) if the bytes cannot be decoded.
    """
    image = data_decode.decode_image(
        encoded, min_short_side=data_views.min_decoded_side(image_size, False)
    )
    return data_views.deterministic_view(image, image_size)


def sanitize(images):
    """NaN -> 0, then clip to [0, 1] (also maps -Inf -> 0, +Inf -> 1)."""
    images = tf.where(tf.math.is_nan(images), tf.zeros_like(images), images)
    return tf.clip_by_value(images, 0.0, 1.0)


class ServingFunctions:
    """The computations behind every exported signature, for one `CGCModel`.

    Heatmaps use `cgc_tf.gradcam.closed_form_cam` when the target layer feeds
    global-average-pooling and a dense layer (exact, no gradient ops, any batch
    size in ONNX); otherwise `cgc_tf.gradcam.gradcam` (GradientTape).
    """

    def __init__(self, model):
        """Args: model: a built `cgc_tf.CGCModel`."""
        self.model = model
        self.backbone = model.backbone
        self.extractor = model.extractor
        height, width = model.image_size
        if height != width:
            raise ValueError(
                f"model {model.name!r} takes {height}x{width} images; export needs square "
                "inputs (image_size x image_size, docs/architecture.md)"
            )
        self.image_size = int(height)
        self.num_classes = int(self.backbone.outputs[0].shape[-1])
        self.dense = gradcam_lib.pooling_dense_head(self.backbone, model.target_layer)

    @property
    def closed_form(self):
        """True when heatmaps use the closed form (pooling + dense head)."""
        return self.dense is not None

    # ------------------------------------------------------------ float inputs
    def _prepare_images(self, images):
        """Checks and sanitises float images; returns (model-size images, (H, W))."""
        shape = tf.shape(images)
        # The last dimension is read with a negative index so that a wrong rank
        # also reaches this message instead of an out-of-range slice error.
        check_channels = tf.debugging.Assert(
            tf.equal(shape[-1], 3),
            [
                "images must be float32 [batch, height, width, 3] (RGB in [0, 1]); "
                "got shape",
                shape,
            ],
            summarize=MAX_SHOWN,
        )
        with tf.control_dependencies([check_channels]):
            images = tf.ensure_shape(tf.identity(images), [None, None, None, 3])
        shape = tf.shape(images)
        check_size = tf.debugging.Assert(
            tf.reduce_all(shape[:3] > 0),
            [
                "images must hold at least one image of at least 1x1 pixels; got shape",
                shape,
            ],
            summarize=MAX_SHOWN,
        )
        with tf.control_dependencies([check_size]):
            images = sanitize(tf.identity(images))
        size = self.image_size
        # tf.image.resize returns its input unchanged when the static size is
        # already S x S; with a dynamic size the bilinear resize to the same size
        # is an exact identity (half-pixel centres, unit scale).
        resized = tf.image.resize(images, [size, size], method="bilinear")
        return resized, shape[1:3]

    def _check_class_index(self, class_index, batch_size):
        """Asserts class_index is int32 [B] with values in [-1, K)."""
        in_range = tf.reduce_all(
            tf.logical_and(class_index >= -1, class_index < self.num_classes)
        )
        same_batch = tf.equal(tf.shape(class_index)[0], batch_size)
        checks = [
            tf.debugging.Assert(
                in_range,
                [
                    f"class_index must be -1 (the predicted class) or in [0, "
                    f"{self.num_classes}); got",
                    class_index,
                ],
                summarize=MAX_SHOWN,
            ),
            tf.debugging.Assert(
                same_batch,
                [
                    "class_index must have one entry per image; got class_index entries "
                    "and images",
                    tf.shape(class_index)[0],
                    batch_size,
                ],
            ),
        ]
        with tf.control_dependencies(checks):
            return tf.identity(class_index)

    def _logits(self, images):
        return tf.cast(self.backbone(images, training=False), tf.float32)

    def _predictions(self, logits):
        return {
            "probabilities": tf.nn.softmax(logits),
            "class_id": tf.argmax(logits, axis=-1, output_type=tf.int32),
        }

    def _forward(self, images, class_index=None, heatmap_size=None):
        """Model-size images -> outputs; class_index int32 [B] or None (prediction)."""
        if heatmap_size is None:
            heatmap_size = tf.shape(images)[1:3]
        features, logits = self.extractor(images, training=False)
        outputs = self._predictions(tf.cast(logits, tf.float32))
        target = outputs["class_id"]
        if class_index is not None:
            target = tf.where(class_index < 0, target, class_index)
        if self.closed_form:
            cam = gradcam_lib.closed_form_cam(features, self.dense.kernel, target)
        else:
            # The tape needs the class before the forward pass it records, so
            # this path runs the model a second time.
            _, cam, _ = gradcam_lib.gradcam(self.extractor, images, target, training=False)
        outputs["heatmap"] = gradcam_lib.upsample(cam, heatmap_size)
        return outputs

    def predict(self, images):
        """Float images float32 [B, H, W, 3] -> probabilities [B, K], class_id [B]."""
        resized, _ = self._prepare_images(images)
        return self._predictions(self._logits(resized))

    def explain(self, images):
        """Float images -> probabilities, class_id and heatmap [B, H, W] of the prediction."""
        resized, size = self._prepare_images(images)
        return self._forward(resized, None, size)

    def explain_class(self, images, class_index):
        """Like `explain`, with the heatmap of class_index int32 [B] (-1 = prediction)."""
        resized, size = self._prepare_images(images)
        class_index = self._check_class_index(class_index, tf.shape(resized)[0])
        return self._forward(resized, class_index, size)

    # ---------------------------------------------------------- bytes inputs
    def decode(self, image_bytes):
        """Decodes a batch of encoded images, skipping the undecodable ones.

        tf.io.decode_image raises on bad data and an exception cannot be caught
        per element inside a graph; tf.data's `ignore_errors` is TensorFlow's way
        to drop the elements whose map function failed, so each image is decoded
        in a one-pass tf.data pipeline and tagged with its batch position.

        Args:
          image_bytes: string [B].

        Returns:
          (images float32 [N, S, S, 3] of the N decodable elements, in order;
          positions int32 [N] of those elements in the batch; valid bool [B]).
        """
        size = self.image_size
        batch_size = tf.shape(image_bytes)[0]

        def decode_one(position, encoded):
            return position, preprocess_encoded(encoded, size)

        dataset = tf.data.Dataset.from_tensor_slices((tf.range(batch_size), image_bytes))
        dataset = dataset.map(decode_one, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
        # One batch holds every decodable element; reduce() also yields the
        # (empty) initial state when nothing decodes.
        dataset = dataset.batch(tf.cast(tf.maximum(batch_size, 1), tf.int64))
        positions, images = dataset.reduce(
            (tf.zeros([0], tf.int32), tf.zeros([0, size, size, 3], tf.float32)),
            lambda state, batch: (
                tf.concat([state[0], batch[0]], axis=0),
                tf.concat([state[1], batch[1]], axis=0),
            ),
        )
        valid = tf.scatter_nd(
            positions[:, None], tf.ones_like(positions, dtype=tf.bool), [batch_size]
        )
        return images, positions, valid

    def _bytes_outputs(self, image_bytes, class_index, with_heatmap):
        images, positions, valid = self.decode(image_bytes)
        batch_size = tf.shape(image_bytes)[0]
        size = self.image_size
        if class_index is not None:
            class_index = self._check_class_index(class_index, batch_size)
            class_index = tf.gather(class_index, positions)
        empty = {
            "probabilities": tf.zeros([0, self.num_classes], tf.float32),
            "class_id": tf.zeros([0], tf.int32),
        }
        if with_heatmap:
            empty["heatmap"] = tf.zeros([0, size, size], tf.float32)

        def run():
            if with_heatmap:
                return self._forward(images, class_index)
            return self._predictions(self._logits(images))

        # The convolutions fail on an empty batch, so the model only runs when
        # at least one image decoded.
        outputs = tf.cond(tf.size(positions) > 0, run, lambda: empty)
        scattered = {}
        for name, value in outputs.items():
            full_shape = tf.concat([[batch_size], tf.shape(value)[1:]], axis=0)
            scattered[name] = tf.scatter_nd(positions[:, None], value, full_shape)
        # Undecodable elements get class -1, never a real class.
        scattered["class_id"] = tf.where(valid, scattered["class_id"], -1)
        scattered["valid"] = valid
        return scattered

    def predict_bytes(self, image_bytes):
        """Encoded images string [B] -> probabilities, class_id, valid."""
        return self._bytes_outputs(image_bytes, None, with_heatmap=False)

    def explain_bytes(self, image_bytes):
        """Encoded images -> probabilities, class_id, heatmap [B, S, S], valid."""
        return self._bytes_outputs(image_bytes, None, with_heatmap=True)

    def explain_bytes_class(self, image_bytes, class_index):
        """Like `explain_bytes`, with the heatmap of class_index int32 [B] (-1 = prediction)."""
        return self._bytes_outputs(image_bytes, class_index, with_heatmap=True)

    def signatures(self):
        """The SavedModel signatures: {name: (function, list of input TensorSpecs)}."""
        return {
            "serving_default": (self.predict, [float_spec()]),
            "explain": (self.explain, [float_spec()]),
            "explain_class": (self.explain_class, [float_spec(), class_index_spec()]),
            "serving_bytes": (self.predict_bytes, [bytes_spec()]),
            "explain_bytes": (self.explain_bytes, [bytes_spec()]),
            "explain_bytes_class": (self.explain_bytes_class, [bytes_spec(), class_index_spec()]),
        }
