"""Consistency losses: hand-computed values, ordering, numerical safety."""

import numpy as np
import tensorflow as tf

from cgc_tf import losses


def _normalize(rows):
    rows = np.asarray(rows, np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


class LossesTest(tf.test.TestCase):
    def test_info_nce_matches_hand_computation(self):
        anchors = _normalize([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
        positives = _normalize([[0.8, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        temperature = 0.5
        expected = []
        for i in range(3):
            logits = [anchors[i] @ positives[i]] + [
                anchors[i] @ anchors[j] for j in range(3) if j != i
            ]
            logits = np.array(logits) / temperature
            expected.append(-logits[0] + np.log(np.exp(logits).sum()))
        value = losses.info_nce(
            tf.constant(anchors, tf.float32), tf.constant(positives, tf.float32), temperature
        )
        self.assertAllClose(value, np.mean(expected), atol=1e-6)

    def test_aligned_pairs_score_lower_than_shuffled(self):
        rng = np.random.default_rng(0)
        anchors = _normalize(rng.random((4, 16)))
        aligned = losses.info_nce(anchors, anchors, 0.5)
        shuffled = losses.info_nce(anchors, anchors[[1, 2, 3, 0]], 0.5)
        self.assertLess(float(aligned), float(shuffled))
        self.assertLess(float(losses.mse(anchors, anchors)), float(losses.mse(anchors, anchors[::-1])))

    def test_mse_value(self):
        a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
        b = np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)
        self.assertAllClose(losses.mse(a, b), 0.5)

    def test_finite_on_all_zero_heatmaps(self):
        heatmaps = tf.zeros([3, 4, 4])
        flat = losses.flatten_and_normalize(heatmaps)
        with tf.GradientTape() as tape:
            tape.watch(heatmaps)
            flat = losses.flatten_and_normalize(heatmaps)
            value = losses.info_nce(flat, flat, 0.5) + losses.mse(flat, flat)
        gradient = tape.gradient(value, heatmaps)
        self.assertTrue(np.isfinite(value.numpy()))
        self.assertTrue(np.all(np.isfinite(gradient.numpy())))

    def test_global_negatives_with_offset_equal_full_batch(self):
        rng = np.random.default_rng(1)
        anchors = tf.constant(_normalize(rng.random((4, 8))), tf.float32)
        positives = tf.constant(_normalize(rng.random((4, 8))), tf.float32)
        full = losses.info_nce(anchors, positives, 0.3)
        halves = [
            losses.info_nce(anchors[s : s + 2], positives[s : s + 2], 0.3, anchors, s)
            for s in (0, 2)
        ]
        self.assertAllClose(full, (halves[0] + halves[1]) / 2, atol=1e-6)

    def test_invalid_arguments(self):
        with self.assertRaisesRegex(ValueError, "temperature=0"):
            losses.info_nce(tf.ones([2, 2]), tf.ones([2, 2]), 0)
        with self.assertRaisesRegex(ValueError, "consistency='cosine'"):
            losses.consistency_loss("cosine", tf.ones([2, 2]), tf.ones([2, 2]), 0.5)


if __name__ == "__main__":
    tf.test.main()
