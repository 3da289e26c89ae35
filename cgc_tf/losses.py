"""Consistency losses between Grad-CAM heatmaps (docs/method.md steps 7-8, and the GC baseline).

Inputs are flattened heatmaps. Both losses are means over the local batch and do
no distribution scaling: the model scales its total loss once.
"""

import tensorflow as tf

CONSISTENCY_LOSSES = ("contrastive", "mse", "none")

# Stands in for -inf on the masked self-similarity logit: exp() of it is exactly
# 0 in float32, and unlike -inf it keeps gradients finite under XLA.
_MASKED_LOGIT = -1e9


def flatten_and_normalize(heatmaps):
    """float [B, H, W] -> float32 [B, H*W], each row L2-normalised (safe on zeros)."""
    heatmaps = tf.cast(heatmaps, tf.float32)
    flat = tf.reshape(heatmaps, [tf.shape(heatmaps)[0], -1])
    return tf.math.l2_normalize(flat, axis=-1, epsilon=1e-12)


def info_nce(anchors, positives, temperature, negatives=None, self_offset=0):
    """InfoNCE consistency loss (docs/method.md step 8).

    For example i, logits_i = [a_i.b_i, a_i.n_j for j != self_offset + i] /
    temperature, target index 0; the loss is the mean cross-entropy over i.
    By default the negatives are the batch's own anchors (n = a, offset 0).

    Args:
      anchors: float32 [B, D] L2-normalised cam(x_aug) (a_i).
      positives: float32 [B, D] L2-normalised T(cam(x_orig)) (b_i).
      temperature: positive float.
      negatives: optional float32 [M, D] negative candidates that contain the
        anchors themselves at rows self_offset .. self_offset + B - 1 (e.g. the
        anchors of all replicas, gathered); those rows are each example's self
        and are masked.
      self_offset: int scalar, row of anchor 0 in `negatives`.

    Returns:
      float32 scalar.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    anchors = tf.cast(anchors, tf.float32)
    positives = tf.cast(positives, tf.float32)
    positive_logits = tf.reduce_sum(anchors * positives, axis=-1, keepdims=True)  # [B, 1]
    if negatives is None:
        negatives = anchors
    negative_logits = tf.matmul(anchors, tf.cast(negatives, tf.float32), transpose_b=True)
    # Masking each example's self-similarity (instead of gathering the other
    # entries as the reference code does) keeps shapes static for XLA; the
    # softmax is identical.
    rows = tf.range(tf.shape(anchors)[0])[:, None] + tf.cast(self_offset, tf.int32)
    columns = tf.range(tf.shape(negative_logits)[1])[None, :]
    negative_logits = tf.where(
        tf.equal(rows, columns), _MASKED_LOGIT * temperature, negative_logits
    )
    logits = tf.concat([positive_logits, negative_logits], axis=1) / temperature
    return -tf.reduce_mean(tf.nn.log_softmax(logits, axis=-1)[:, 0])


def mse(anchors, positives):
    """Mean squared error over all elements (the GC baseline, as torch's mse_loss).

    Args:
      anchors, positives: float32 [B, D].

    Returns:
      float32 scalar.
    """
    difference = tf.cast(anchors, tf.float32) - tf.cast(positives, tf.float32)
    return tf.reduce_mean(tf.square(difference))


def consistency_loss(kind, anchors, positives, temperature, negatives=None, self_offset=0):
    """Dispatches on `kind` in CONSISTENCY_LOSSES ("none", the plain baseline, has no
    consistency term in CGCModel's step; here it gives the InfoNCE value)."""
    if kind == "mse":
        return mse(anchors, positives)
    if kind in ("contrastive", "none"):
        return info_nce(anchors, positives, temperature, negatives, self_offset)
    raise ValueError(f"consistency={kind!r} is not one of {CONSISTENCY_LOSSES}")
