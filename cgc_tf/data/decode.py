"""Robust image decoding for the input pipelines, and the corrupt-file policy.

`try_decode` turns encoded bytes into uint8 [H, W, 3] plus a success flag
instead of raising (grayscale, alpha, CMYK and 16-bit PNGs handled as PIL does;
huge JPEGs DCT-downscaled), so a pipeline can fail naming a corrupt file or skip
and count it (`CorruptImageCounter`); `validate_files` checks a folder up front.
Formats, channel rules and the policy: docs/data.md (decoding and corrupt files).
"""

import concurrent.futures
import os

from absl import logging
import tensorflow as tf

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")
# A full-decode validation pass over this many encoded bytes takes a few seconds
# on one core; above it, only headers are checked when the dataset is built.
FULL_VALIDATION_MAX_BYTES = 200 * 2**20
# libjpeg's DCT scaling factors that tf.io.decode_jpeg exposes as `ratio`.
_JPEG_RATIOS = (8, 4, 2)
_HEADER_BYTES = 16
_HEADER_THREADS = 16
# Magic bytes of the formats tf.io.decode_image reads.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
_DECODE_FAILURE = (
    "Could not read or decode image file (unreadable, not an image, corrupt or "
    "truncated; pass skip_corrupt_images=True to skip and count such files):"
)


def has_image_extension(path):
    """True if `path` ends with one of `IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def image_format(header):
    """The image format named by the magic bytes at the start of a file.

    Args:
      header: bytes, the first bytes of the file (12 are enough).

    Returns:
      "JPEG", "PNG", "GIF", "BMP" or "WEBP", or None for anything else.
    """
    for signature, name in _SIGNATURES:
        if header.startswith(signature):
            return name
    if header[:4] == b"RIFF" and header[8:12] == b"WEBP":
        return "WEBP"
    return None


def _jpeg_ratio(encoded, min_short_side):
    """Largest DCT scaling ratio keeping the decoded short side >= min_short_side."""
    shape = tf.image.extract_jpeg_shape(encoded)
    short_side = tf.minimum(shape[0], shape[1])
    # libjpeg rounds the scaled size up, so floor division is a safe lower bound.
    ratio = tf.constant(1, tf.int32)
    for candidate in reversed(_JPEG_RATIOS):
        fits = short_side // candidate >= min_short_side
        ratio = tf.where(fits, tf.constant(candidate, tf.int32), ratio)
    return ratio


def _decode_jpeg(encoded, min_short_side):
    # INTEGER_ACCURATE (libjpeg's JDCT_ISLOW) gives the same pixels as PIL, the
    # reference implementation's loader; TF's default fast IDCT is off by ~1-5 levels.
    def decode(ratio):
        return tf.io.decode_jpeg(
            encoded, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE"
        )

    if min_short_side is None:
        return decode(1)
    # `ratio` is an op attribute, not a tensor input: one branch per value.
    ratio = _jpeg_ratio(encoded, min_short_side)
    ratios = (1,) + tuple(reversed(_JPEG_RATIOS))
    index = tf.argmax(tf.cast(tf.equal(ratio, ratios), tf.int32), output_type=tf.int32)
    return tf.switch_case(index, [lambda r=r: decode(r) for r in ratios])


def decode_image(encoded, min_short_side=None):
    """Decodes one encoded image to RGB; raises on corrupt data.

    Args:
      encoded: scalar string tensor, the bytes of a JPEG/PNG/GIF/BMP/WebP file.
      min_short_side: optional Python int. If given, JPEGs are decoded with the
        largest DCT downscaling that keeps the short side >= this many pixels.

    Returns:
      uint8 [H, W, 3]; grayscale replicated, alpha dropped, CMYK converted,
      16-bit scaled to 8 bits, the first frame of an animated GIF.

    Raises:
      tf.errors.InvalidArgumentError: (when run) if the bytes cannot be decoded.
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)
    min_short_side = None if min_short_side is None else int(min_short_side)
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: _decode_jpeg(encoded, min_short_side),
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
    )
    image.set_shape([None, None, 3])
    return image


def try_decode(encoded=None, path=None, min_short_side=None):
    """Reads (optionally) and decodes one image without raising on corrupt data.

    Usable inside `tf.data` map functions. TensorFlow has no in-graph try/except,
    so the read and decode run in a one-element `tf.data` pipeline with
    `ignore_errors()`, followed by a fallback element: the first element is the
    decoded image if everything worked, the fallback otherwise.

    Args:
      encoded: scalar string tensor of encoded bytes, or None to read `path`.
      path: scalar string tensor, the file to read when `encoded` is None.
      min_short_side: see `decode_image`.

    Returns:
      (image uint8 [H, W, 3], ok bool []); image is [0, 0, 3] when ok is False.
    """
    if (encoded is None) == (path is None):
        raise ValueError("try_decode needs exactly one of encoded= and path=")

    def decode(source):
        data = tf.io.read_file(source) if encoded is None else source
        return decode_image(data, min_short_side), tf.constant(True)

    source = path if encoded is None else encoded
    decoded = tf.data.Dataset.from_tensors(source).map(decode).ignore_errors()
    fallback = tf.data.Dataset.from_tensors((tf.zeros([0, 0, 3], tf.uint8), tf.constant(False)))
    image, ok = decoded.concatenate(fallback).take(1).get_single_element()
    image.set_shape([None, None, 3])
    return image, ok


class CorruptImageCounter:
    """The distinct corrupt image files (or tfds record ids) that were skipped.

    Pass one to the dataset builders with `skip_corrupt_images=True`. Files are
    recorded by the validation pass when the dataset is built and by the tf.data
    graph when decoding fails during iteration; each name counts once however
    often it is met. Backed by a `tf.lookup.experimental.MutableHashTable`, so it
    works from parallel tf.data threads and under distribution strategies (one
    counter per worker process).

    Example:
      counter = CorruptImageCounter()
      ds = cgc_tf.data.train_dataset("folder:/data", 32, 224, skip_corrupt_images=True,
                                     corrupt_image_counter=counter)
      model.fit(ds)
      print(counter.count, counter.names()[:10])
    """

    def __init__(self):
        self._table = tf.lookup.experimental.MutableHashTable(
            key_dtype=tf.string, value_dtype=tf.int64, default_value=0
        )

    def record(self, name):
        """Records `name` (Python str or scalar string tensor); usable in graphs.

        Returns:
          The insert op (ignore it in eager mode).
        """
        name = tf.reshape(tf.convert_to_tensor(name, tf.string), [1])
        return self._table.insert(name, tf.ones([1], tf.int64))

    @property
    def count(self):
        """int: number of distinct names recorded so far."""
        return int(self._table.size())

    def names(self):
        """Sorted list of the recorded names (str)."""
        keys, _ = self._table.export()
        return sorted(key.decode("utf-8", "replace") for key in keys.numpy().tolist())


def decode_or_fail(name, encoded=None, min_short_side=None):
    """Decodes, or fails with an `InvalidArgumentError` naming `name`.

    Args:
      name: scalar string tensor, the file path or tfds record id.
      encoded: scalar string tensor of bytes, or None to read the file `name`.
      min_short_side: see `decode_image`.

    Returns:
      uint8 [H, W, 3].
    """
    if encoded is None:
        image, ok = try_decode(path=name, min_short_side=min_short_side)
    else:
        image, ok = try_decode(encoded=encoded, min_short_side=min_short_side)
    check = tf.debugging.Assert(ok, [_DECODE_FAILURE, name])
    with tf.control_dependencies([check]):
        return tf.identity(image)


def decode_or_skip(name, counter, encoded=None, min_short_side=None):
    """Decodes; on failure records `name` in `counter` and logs a warning.

    Args:
      name: scalar string tensor, the file path or tfds record id.
      counter: a `CorruptImageCounter`.
      encoded: scalar string tensor of bytes, or None to read the file `name`.
      min_short_side: see `decode_image`.

    Returns:
      (image uint8 [H, W, 3], ok bool []): filter on ok to drop the failures.
    """
    if encoded is None:
        image, ok = try_decode(path=name, min_short_side=min_short_side)
    else:
        image, ok = try_decode(encoded=encoded, min_short_side=min_short_side)

    def record_failure():
        with tf.control_dependencies([counter.record(name)]):
            print_op = tf.print(
                "Skipping corrupt image (skip_corrupt_images=True):", name,
                output_stream=logging.warning,
            )
        with tf.control_dependencies([print_op]):
            return tf.identity(ok)

    ok = tf.cond(ok, lambda: ok, record_failure)
    return image, ok


def check_file(path):
    """Cheap header check of one file, in Python.

    Args:
      path: str, a file path (symlinks are followed).

    Returns:
      None if the file is readable and starts with the magic bytes of a supported
      format, otherwise a short reason (str).
    """
    try:
        with open(path, "rb") as handle:
            header = handle.read(_HEADER_BYTES)
    except OSError as error:
        if os.path.islink(path) and not os.path.exists(path):
            return "dangling symlink"
        return f"unreadable ({error.strerror or error})"
    if not header:
        return "empty file"
    if image_format(header) is None:
        return "not a JPEG, PNG, GIF, BMP or WebP file"
    return None


def total_file_bytes(paths):
    """Summed size in bytes of the files at `paths` (unreadable ones count 0: the
    validation pass reports them)."""
    total = 0
    for path in paths:
        try:
            total += os.stat(path).st_size
        except OSError:
            pass
    return total


def validate_files(paths, full_decode, min_short_side=None):
    """The validation pass of a folder dataset.

    Args:
      paths: sequence of str file paths.
      full_decode: bool; also decode every file that passes the header check
        (in parallel tf.data, with the pipeline's decoder).
      min_short_side: see `decode_image` (so decoded shapes match the pipeline's).

    Returns:
      (problems, shapes): `problems` maps each corrupt path to a reason (str);
      `shapes` maps each decoded path to its decoded (height, width), empty when
      `full_decode` is False.
    """
    paths = list(paths)
    with concurrent.futures.ThreadPoolExecutor(_HEADER_THREADS) as pool:
        reasons = list(pool.map(check_file, paths))
    problems = {path: reason for path, reason in zip(paths, reasons) if reason is not None}
    shapes = {}
    if not full_decode:
        return problems, shapes
    readable = [path for path in paths if path not in problems]
    if not readable:
        return problems, shapes

    def decoded_shape(path):
        image, ok = try_decode(path=path, min_short_side=min_short_side)
        return ok, tf.shape(image)[:2]

    dataset = tf.data.Dataset.from_tensor_slices(readable).map(
        decoded_shape, num_parallel_calls=tf.data.AUTOTUNE
    )
    for path, (ok, shape) in zip(readable, dataset.as_numpy_iterator()):
        if ok:
            shapes[path] = (int(shape[0]), int(shape[1]))
        else:
            problems[path] = "corrupt or truncated image data (decoding failed)"
    return problems, shapes


def describe_problems(problems, limit=10):
    """A readable multi-line list of corrupt files (at most `limit` lines)."""
    lines = [f"  {path}: {reason}" for path, reason in sorted(problems.items())[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
