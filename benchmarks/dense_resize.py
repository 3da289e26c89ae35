"""The dense formulation of `cgc_tf.resample.crop_flip_resize`, which the gathers replaced.

Kept as the baseline of benchmarks/crop_flip_resize.py (e.g. for an accelerator
where dense contractions beat gathers) and as an oracle of the gathers in
tests/augment_test.py. It defines no flags, so tests can import it next to any
binary's flags.
"""

import tensorflow as tf


def crop_flip_resize(images, boxes, flips, output_size):
    """`crop_flip_resize` by dense interpolation matrices and two einsums.

    Per example, one matrix [out, in] per axis built from one-hot rows holds the two
    bilinear weights of each output sample; the flip reverses the rows of the
    column matrix. Cost O(output pixels x input side), against the gathers'
    O(output pixels).

    Args:
      images: float32 [B, H, W, C] with static H, W.
      boxes: float32 [B, 4], normalised [y1, x1, y2, x2] (crop_and_resize convention).
      flips: bool or float [B]; true (nonzero) flips the example left-right.
      output_size: two Python ints (out_h, out_w), each >= 1.

    Returns:
      float32 [B, out_h, out_w, C].
    """

    def matrix(start, end, input_size, size):
        # The same coordinates and 1e-3 pixel border tolerance as the library's taps.
        last = float(input_size - 1)
        if size > 1:
            scale = (end - start) * last / float(size - 1)
            positions = tf.range(size, dtype=tf.float32)
            coordinates = start[:, None] * last + positions[None, :] * scale[:, None]
        else:
            coordinates = (0.5 * (start + end) * last)[:, None]
        inside = (coordinates >= -1e-3) & (coordinates <= last + 1e-3)
        lower = tf.floor(coordinates)
        fraction = coordinates - lower
        lower_index = tf.cast(tf.clip_by_value(lower, 0.0, last), tf.int32)
        upper_index = tf.cast(tf.clip_by_value(tf.math.ceil(coordinates), 0.0, last), tf.int32)
        weights = (
            tf.one_hot(lower_index, input_size) * (1.0 - fraction)[..., None]
            + tf.one_hot(upper_index, input_size) * fraction[..., None]
        )
        return weights * tf.cast(inside, tf.float32)[..., None]

    rows = matrix(boxes[:, 0], boxes[:, 2], images.shape[1], output_size[0])
    columns = matrix(boxes[:, 1], boxes[:, 3], images.shape[2], output_size[1])
    columns = tf.where(tf.cast(flips, tf.bool)[:, None, None], columns[:, ::-1], columns)
    resized = tf.einsum("boh,bhwc->bowc", rows, images)
    return tf.einsum("bpw,bowc->bopc", columns, resized)
