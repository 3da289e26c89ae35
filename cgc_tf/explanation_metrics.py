"""Explanation-quality metrics beyond localisation: sparseness, max-sensitivity, ROAD, sanity.

Heatmaps are float [B, H, W]; explainers are callables `(images [B, H, W, C],
class_index int32 [B]) -> heatmaps [B, H, W]`, e.g. `lambda x, c: cgc_tf.explain(model,
x, c)`. Re-exported by `cgc_tf.metrics`; definitions and references: docs/explain.md.
"""

import keras
import numpy as np
import tensorflow as tf

# ROAD's neighbour weights for the linear imputation (its `neighbors_weights`):
# direct neighbours 1/6, diagonal ones 1/12.
ROAD_NEIGHBOURS = (
    ((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
    ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6),
)
ROAD_NOISE = 0.01
ROAD_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)


def sparseness(heatmaps):
    """Gini index of each heatmap (Chalasani et al. 2020, "Concise explanations ...").

    G = sum_i (2 i - n - 1) a_(i) / (n sum_i a_(i)) over the n values sorted in
    increasing order, a = |heatmap| + 1e-7 (as Quantus computes it): 0 for a
    uniform map, (n - 1) / n for a single non-zero pixel. Higher is sparser.

    Args:
      heatmaps: float [B, H, W].

    Returns:
      float32 [B] in [0, 1).
    """
    values = tf.reshape(tf.abs(tf.cast(heatmaps, tf.float64)), [tf.shape(heatmaps)[0], -1])
    values = tf.sort(values + 1e-7, axis=-1)
    count = tf.cast(tf.shape(values)[1], tf.float64)
    index = tf.range(1, count + 1, dtype=tf.float64)
    numerator = tf.reduce_sum((2 * index - count - 1) * values, axis=-1)
    return tf.cast(numerator / (count * tf.reduce_sum(values, axis=-1)), tf.float32)


def max_sensitivity(explainer, images, class_index, radius=0.02, num_samples=10, seed=0):
    """Max-sensitivity (Yeh et al. 2019, "On the (in)fidelity and sensitivity of explanations").

    SENS_max(x) = max_j ||Phi(x + d_j) - Phi(x)||_2 / ||Phi(x)||_2 with d_j
    drawn uniformly from the L-infinity ball of radius r (Monte Carlo,
    `num_samples` draws), the class fixed to `class_index`. Normalising by
    ||Phi(x)|| (Quantus' default) makes the scores of heatmaps of different
    scales comparable. Lower is more robust.

    Args:
      explainer: (images, class_index) -> float heatmaps [B, H, W].
      images: float32 [B, H, W, C].
      class_index: int32 [B].
      radius: float r > 0, in the images' units.
      num_samples: int >= 1.
      seed: int, seeds the perturbations (stateless).

    Returns:
      float32 [B] (0 where Phi(x) is all zero and stays so).
    """
    if radius <= 0 or num_samples < 1:
        raise ValueError(
            f"radius={radius!r} must be > 0 and num_samples={num_samples!r} >= 1"
        )
    images = tf.cast(tf.convert_to_tensor(images), tf.float32)
    class_index = tf.cast(tf.convert_to_tensor(class_index), tf.int32)
    reference = _flat(explainer(images, class_index))
    norm = tf.norm(reference, axis=-1)
    worst = tf.zeros_like(norm)
    for sample in range(num_samples):
        noise = tf.random.stateless_uniform(
            tf.shape(images), seed=[seed, sample], minval=-radius, maxval=radius
        )
        change = tf.norm(_flat(explainer(images + noise, class_index)) - reference, axis=-1)
        worst = tf.maximum(worst, tf.math.divide_no_nan(change, norm))
    return worst


def _flat(heatmaps):
    heatmaps = tf.cast(heatmaps, tf.float32)
    return tf.reshape(heatmaps, [tf.shape(heatmaps)[0], -1])


def noisy_linear_imputation(image, removed, noise=ROAD_NOISE, seed=0):
    """ROAD's imputation: removed pixels become the neighbour-weighted mean, plus noise.

    Solves, for the removed pixels jointly, x_i = sum_j w_j x_j / sum_j w_j over
    the in-image 8-neighbours j (weights `ROAD_NEIGHBOURS`; removed neighbours
    are unknowns of the same sparse linear system), per channel, then adds
    Gaussian noise of standard deviation `noise` to them (Rong et al. 2022,
    "A Consistent and Efficient Evaluation Strategy for Attribution Methods").

    Args:
      image: float [H, W, C] numpy or tensor.
      removed: bool [H, W], True where the pixel is removed.
      noise: float >= 0.
      seed: int, seeds the noise.

    Returns:
      float32 numpy [H, W, C].
    """
    from scipy import sparse
    from scipy.sparse import linalg

    image = np.asarray(image, np.float64)
    removed = np.asarray(removed, bool)
    height, width, channels = image.shape
    rows, columns = np.nonzero(removed)
    if rows.size == 0:
        return image.astype(np.float32)
    unknown = -np.ones((height, width), np.int64)
    unknown[rows, columns] = np.arange(rows.size)
    equations = np.arange(rows.size)
    entries = ([], [], [])  # COO rows, columns, values of the unknowns' couplings
    right = np.zeros((rows.size, channels))
    total = np.zeros(rows.size)
    for (row_offset, column_offset), weight in ROAD_NEIGHBOURS:
        neighbour_rows, neighbour_columns = rows + row_offset, columns + column_offset
        inside = (
            (neighbour_rows >= 0) & (neighbour_rows < height)
            & (neighbour_columns >= 0) & (neighbour_columns < width)
        )
        index, r, c = equations[inside], neighbour_rows[inside], neighbour_columns[inside]
        total[index] += weight
        is_unknown = removed[r, c]
        entries[0].append(index[is_unknown])
        entries[1].append(unknown[r[is_unknown], c[is_unknown]])
        entries[2].append(np.full(int(is_unknown.sum()), -weight))
        known = ~is_unknown
        np.add.at(right, index[known], weight * image[r[known], c[known]])
    entries[0].append(equations)
    entries[1].append(equations)
    entries[2].append(total)
    matrix = sparse.csc_matrix(
        (np.concatenate(entries[2]), (np.concatenate(entries[0]), np.concatenate(entries[1]))),
        shape=(rows.size, rows.size),
    )
    solution = linalg.spsolve(matrix, right).reshape(rows.size, channels)
    result = image.copy()
    result[rows, columns] = solution + noise * np.random.default_rng(seed).standard_normal(
        solution.shape
    )
    return result.astype(np.float32)


def road(predict, images, heatmaps, class_index, fractions=ROAD_FRACTIONS, noise=ROAD_NOISE, seed=0):
    """ROAD (Rong et al. 2022): class probability after removing ranked pixels.

    For each fraction p, the p most relevant pixels (MoRF, by heatmap value) or
    the p least relevant (LeRF) are replaced by `noisy_linear_imputation`, and
    the model's probability of `class_index` is read. A faithful explanation
    has a MoRF curve that falls fast (low mean) and a LeRF curve that stays
    high; "road_gap" = mean(LeRF) - mean(MoRF), higher is better.

    Args:
      predict: images float32 [B, H, W, C] -> probabilities float [B, K].
      images: float32 [B, H, W, C].
      heatmaps: float [B, H, W] at the image size.
      class_index: int [B].
      fractions: increasing fractions in (0, 1).
      noise, seed: as `noisy_linear_imputation`.

    Returns:
      dict: "fractions" float32 [F]; "morf", "lerf" float32 [B, F] probabilities.
    """
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0.0 < f < 1.0 for f in fractions):
        raise ValueError(f"fractions={fractions!r} must be non-empty, each in (0, 1)")
    images = np.asarray(images, np.float32)
    heatmaps = np.asarray(heatmaps, np.float64)
    class_index = np.asarray(class_index, np.int64)
    batch, height, width = heatmaps.shape
    # Stable order: ties keep raster order, so results do not depend on the sort.
    order = np.argsort(-heatmaps.reshape(batch, -1), axis=1, kind="stable")
    curves = {"morf": np.zeros((batch, len(fractions))), "lerf": np.zeros((batch, len(fractions)))}
    for step, fraction in enumerate(fractions):
        count = int(round(fraction * height * width))
        for name in curves:
            imputed = np.empty_like(images)
            for example in range(batch):
                ranked = order[example] if name == "morf" else order[example][::-1]
                removed = np.zeros(height * width, bool)
                removed[ranked[:count]] = True
                imputed[example] = noisy_linear_imputation(
                    images[example], removed.reshape(height, width), noise, seed + example
                )
            probabilities = np.asarray(predict(tf.constant(imputed)), np.float64)
            curves[name][:, step] = probabilities[np.arange(batch), class_index]
    return {
        "fractions": np.asarray(fractions, np.float32),
        "morf": curves["morf"].astype(np.float32),
        "lerf": curves["lerf"].astype(np.float32),
    }


def spearman(first, second):
    """Spearman rank correlation per example of two [B, ...] arrays (average ranks for ties).

    Returns float32 [B]; 0 where either map is constant.
    """
    from scipy import stats

    first = np.asarray(first, np.float64).reshape(len(first), -1)
    second = np.asarray(second, np.float64).reshape(len(second), -1)
    result = np.zeros(len(first))
    for example, (a, b) in enumerate(zip(first, second)):
        a, b = stats.rankdata(a), stats.rankdata(b)
        a, b = a - a.mean(), b - b.mean()
        denominator = np.linalg.norm(a) * np.linalg.norm(b)
        result[example] = float(a @ b / denominator) if denominator > 0 else 0.0
    return result.astype(np.float32)


def randomization_sanity(model, explain, images, class_index, seed=0, max_layers=None):
    """Cascading model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps").

    Starting from the output layer and moving towards the input, the weights
    of one more layer are randomised at each step (each variable of the layer
    replaced by a seeded Gaussian of its own mean and standard deviation, so
    its scale is kept and its learnt structure is destroyed), on a copy of
    `model`. After each step the heatmaps of the same classes are compared
    with the trained model's by Spearman rank correlation. An explanation that
    depends on the learnt weights gives correlations that fall as more layers
    are randomised; one that stays high is insensitive to the model.

    Args:
      model: a built functional or Sequential keras.Model (left unchanged).
      explain: (model, images, class_index) -> heatmaps float [B, H, W], e.g.
        `lambda m, x, c: cgc_tf.explain(m, x, c, target_layer=name)` (a fixed
        layer: the automatic choice may move on a randomised model).
      images: float32 [B, H, W, C].
      class_index: int [B], kept fixed for all steps.
      seed: int, seeds the random weights.
      max_layers: optional int, stop after this many layers (cost control).

    Returns:
      list of (layer name, float32 [B] Spearman correlations), top layer first.
    """
    class_index = tf.cast(tf.convert_to_tensor(class_index), tf.int32)
    reference = np.asarray(explain(model, images, class_index))
    randomized = keras.models.clone_model(model)
    randomized.set_weights(model.get_weights())
    layers = [layer for layer in reversed(randomized.layers) if layer.trainable_weights]
    if max_layers is not None:
        layers = layers[:max_layers]
    rng = np.random.default_rng(seed)
    steps = []
    for layer in layers:
        for variable in layer.trainable_weights:
            value = np.asarray(variable)
            variable.assign(
                rng.normal(value.mean(), value.std(), value.shape).astype(value.dtype)
            )
        heatmaps = np.asarray(explain(randomized, images, class_index))
        steps.append((layer.name, spearman(reference, heatmaps)))
    return steps
