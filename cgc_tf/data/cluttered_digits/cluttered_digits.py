"""The tfds builder of `cluttered_digits`, the embedded default dataset.

What: `ClutteredDigits` writes, offline and deterministically, examples
{"image": uint8 [S, S, 3], "label": 0..9, "bbox": float32 [4] (tight box of the
digit's ink), "source_index": int32} rendered by `canvas.render_example` from
scikit-learn's 1,797 8x8 digits; splits by source digit (train 5,748 / test 720
examples; holdout configs add validation). Why: a small real-digit dataset with
boxes that needs no download. Content, splits and determinism:
cgc_tf/data/cluttered_digits/README.md.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from cgc_tf.data.cluttered_digits import canvas

DEFAULT_SEED = 20_211_001
"""Base seed of the split permutation and of every example's generator."""

DEFAULT_IMAGE_SIZE = 48

NUM_SOURCE_DIGITS = 1_797
NUM_TRAIN_SOURCE_DIGITS = 1_437
PLACEMENTS_PER_DIGIT = {"train": 4, "test": 2}
SPLIT_IDS = {"train": 0, "test": 1}
# Holdout configs validate on every HOLDOUT_EVERY-th train source digit.
HOLDOUT_EVERY = 7
MIN_FRAGMENTS = 2
MAX_FRAGMENTS = 4

_CLASS_NAMES = [str(digit) for digit in range(10)]

_DESCRIPTION = """\
Real handwritten digits (scikit-learn's 1,797 8x8 `load_digits` images) drawn at
a random scale (40%-70% of the canvas side) and position on a square RGB canvas
with random, well-contrasted foreground and background colours, plus 2-4
clutter fragments cut from digits of other classes, in their own colours.
Features: the image, the main digit's label, the tight bounding box of its ink
and the index of its source digit. Train and test are split by source digit
(1,437 / 360 digits, 4 / 2 placements each: 5,748 / 720 examples). Every example
comes from a fixed-seed generator, so builds are reproducible.
"""

_CITATION = """\
@InProceedings{Pillai_2022_CVPR,
  author    = {Pillai, Vipin and Koohpayegani, Soroush Abbasi and Ouligian, Ashley and Fong, Dennis and Pirsiavash, Hamed},
  title     = {Consistent Explanations by Contrastive Learning},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  month     = {June},
  year      = {2022},
  pages     = {10213-10222}
}
"""


@functools.lru_cache(maxsize=1)
def load_source_digits():
    """Loads the scikit-learn handwritten digits (bundled with sklearn, offline).

    Returns:
      (images, labels): images float64 [1797, 8, 8] with values in [0, 16];
      labels int64 [1797] with values in [0, 9]. Both are read-only because
      the cached arrays are shared by every caller.
    """
    # Imported here so that importing (registering) the builder stays cheap.
    from sklearn import datasets

    digits = datasets.load_digits()
    images = np.asarray(digits.images, dtype=np.float64)
    labels = np.asarray(digits.target, dtype=np.int64)
    expected_shape = (NUM_SOURCE_DIGITS, canvas.SOURCE_SIDE, canvas.SOURCE_SIDE)
    if images.shape != expected_shape:
        raise ValueError(
            f"sklearn.datasets.load_digits() returned images of shape {images.shape}; "
            f"cluttered_digits expects {expected_shape}"
        )
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def split_source_indices(split, seed=DEFAULT_SEED):
    """Returns the source-digit indices of `split`.

    Args:
      split: "train" or "test".
      seed: int, base seed of the fixed permutation.

    Returns:
      int64 [1437] (train) or [360] (test), sorted ascending. The two splits are
      disjoint and together cover all 1,797 digits.

    Raises:
      ValueError: if `split` is not "train" or "test".
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    # Two-entry seed: can never collide with the four-entry per-example seeds.
    permutation = np.random.default_rng([seed, 0]).permutation(NUM_SOURCE_DIGITS)
    if split == "train":
        chosen = permutation[:NUM_TRAIN_SOURCE_DIGITS]
    else:
        chosen = permutation[NUM_TRAIN_SOURCE_DIGITS:]
    return np.sort(chosen).astype(np.int64)


def holdout_source_indices(seed=DEFAULT_SEED):
    """Returns the train source digits that holdout configs use for `validation`.

    Args:
      seed: int, base seed of the fixed permutation (see `split_source_indices`).

    Returns:
      int64 [206]: every HOLDOUT_EVERY-th entry of `split_source_indices("train")`
      (positions 0, 7, 14, ...), sorted ascending.
    """
    return split_source_indices("train", seed)[::HOLDOUT_EVERY]


def _generate_from_arrays(images, labels, split_sources, split_id, source_index, placement,
                          image_size, seed):
    """Unchecked core shared by `generate_example` and the builder (see there)."""
    rng = np.random.default_rng([seed, split_id, source_index, placement])
    label = int(labels[source_index])
    # Clutter comes only from the same split (keeps the splits disjoint) and
    # from other classes (a genuine distractor, never a second copy of the answer).
    candidates = split_sources[labels[split_sources] != label]
    fragment_count = int(rng.integers(MIN_FRAGMENTS, MAX_FRAGMENTS + 1))
    clutter_indices = rng.choice(candidates, size=fragment_count, replace=False)
    image, bbox, ink_mask = canvas.render_example(
        images[source_index], rng, image_size, images[clutter_indices]
    )
    example = {"image": image, "label": label, "bbox": bbox, "source_index": source_index}
    return example, ink_mask


def generate_example(split, source_index, placement, image_size, seed=DEFAULT_SEED):
    """Regenerates example (split, source_index, placement) exactly as the builder stores it.

    Args:
      split: "train" or "test".
      source_index: int, index of the main digit in `load_digits()`; must be a
        source digit of `split`.
      placement: int in [0, PLACEMENTS_PER_DIGIT[split]).
      image_size: int >= 16, the canvas side S.
      seed: int, base seed (the builder uses DEFAULT_SEED).

    Returns:
      (example, ink_mask): `example` is a dict with "image" uint8 [S, S, 3],
      "label" int, "bbox" float32 [4] and "source_index" int; `ink_mask` is the
      bool [S, S] mask of `render_example`.

    Raises:
      ValueError: if `split`, `source_index`, `placement` or `image_size` is
        invalid.
    """
    images, labels = load_source_digits()
    split_sources = split_source_indices(split, seed)
    if source_index not in set(split_sources.tolist()):
        raise ValueError(
            f"source_index must be a source digit of split {split!r} (see "
            f"split_source_indices), got {source_index!r}"
        )
    placements = PLACEMENTS_PER_DIGIT[split]
    if not 0 <= placement < placements:
        raise ValueError(
            f"placement must be in [0, {placements}) for split {split!r}, got {placement!r}"
        )
    return _generate_from_arrays(
        images,
        labels,
        split_sources,
        SPLIT_IDS[split],
        int(source_index),
        int(placement),
        canvas.validate_image_size(image_size),
        seed,
    )


@dataclasses.dataclass(eq=False)
class ClutteredDigitsConfig(tfds.core.BuilderConfig):
    """Builder config of `cluttered_digits`.

    Attributes:
      image_size: int >= 16, the canvas side S; images are uint8 [S, S, 3].
      holdout: bool; True splits the train digits into `train` and `validation`
        (see README.md beside this module).
    """

    image_size: int = DEFAULT_IMAGE_SIZE
    holdout: bool = False

    def __post_init__(self):
        canvas.validate_image_size(self.image_size)
        if self.description is None:
            self.description = f"{self.image_size}x{self.image_size} RGB canvases."


def config_for_size(image_size, holdout=False):
    """Returns the config for `image_size`: the predefined one, or a new custom one.

    Args:
      image_size: int >= 16, the canvas side.
      holdout: bool, the holdout config (train / validation / test splits).

    Returns:
      The `ClutteredDigitsConfig` named f"size{image_size}" (f"size{image_size}_holdout"
      with `holdout`). For 48 and 64 without holdout it is the very object in
      `ClutteredDigits.BUILDER_CONFIGS`, because tfds rejects a different object
      that reuses a predefined name.

    Raises:
      ValueError: if `image_size` is not an integer >= 16.
    """
    image_size = canvas.validate_image_size(image_size)
    for config in ClutteredDigits.BUILDER_CONFIGS:
        if config.image_size == image_size and config.holdout == bool(holdout):
            return config
    suffix = "_holdout" if holdout else ""
    return ClutteredDigitsConfig(
        name=f"size{image_size}{suffix}", image_size=image_size, holdout=bool(holdout)
    )


class ClutteredDigits(tfds.core.GeneratorBasedBuilder):
    """tfds builder of `cluttered_digits` (README.md beside this module describes it)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": (
            "Initial release: scikit-learn digits at random scale and position on "
            "random-colour canvases with 2-4 fragments of other-class digits; tight "
            "ink bounding boxes; split by source digit (1,437 / 360 digits, "
            "5,748 / 720 examples)."
        ),
    }
    BUILDER_CONFIGS = [
        ClutteredDigitsConfig(name="size48", image_size=48),
        ClutteredDigitsConfig(name="size64", image_size=64),
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """epath.Path of this module (tfds looks for checksums.tsv next to it)."""
        # tfds 4.9.10's default evaluates `importlib_resources.abc.Traversable`
        # for every builder defined in a package, and that optional backport is
        # not installed, so the default raises ModuleNotFoundError in
        # download_and_prepare.
        return epath.Path(inspect.getfile(cls))

    def _info(self):
        image_size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(image_size, image_size, 3), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(names=_CLASS_NAMES),
                    "bbox": tfds.features.BBoxFeature(
                        doc="Tight box around the main digit's ink: [ymin, xmin, ymax, "
                        "xmax] normalised to [0, 1]."
                    ),
                    "source_index": tfds.features.Scalar(
                        dtype=np.int32,
                        doc="Index of the main digit in sklearn.datasets.load_digits().",
                    ),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=None,
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is rendered locally; nothing to download.
        if not self.builder_config.holdout:
            return {split: self._generate_examples(split) for split in SPLIT_IDS}
        held_out = holdout_source_indices()
        return {
            "train": self._generate_examples("train", exclude=held_out),
            "validation": self._generate_examples("train", only=held_out),
            "test": self._generate_examples("test"),
        }

    def _generate_examples(self, split, only=None, exclude=None) -> Iterator[tuple[str, dict]]:
        """Examples of `split`'s source digits, restricted to `only` / without `exclude`."""
        images, labels = load_source_digits()
        split_sources = split_source_indices(split)
        main_digits = split_sources
        if only is not None:
            main_digits = main_digits[np.isin(main_digits, only)]
        if exclude is not None:
            main_digits = main_digits[~np.isin(main_digits, exclude)]
        image_size = self.builder_config.image_size
        for source_index in main_digits.tolist():
            for placement in range(PLACEMENTS_PER_DIGIT[split]):
                example, _ = _generate_from_arrays(
                    images,
                    labels,
                    split_sources,
                    SPLIT_IDS[split],
                    source_index,
                    placement,
                    image_size,
                    DEFAULT_SEED,
                )
                yield f"{source_index:04d}_{placement}", example
