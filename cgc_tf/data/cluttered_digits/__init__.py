"""The embedded default dataset `cluttered_digits` (a tensorflow-datasets builder).

Importing registers the builder with tfds. `load(split, data_dir, image_size=48)` gives
dicts with `image` uint8 [S, S, 3] and `label` int64; `canvas` renders one example in
NumPy, `cluttered_digits` is the builder. Content, splits and determinism: README.md
beside this file.
"""

from cgc_tf.data.cluttered_digits import canvas
from cgc_tf.data.cluttered_digits.canvas import (
    MIN_IMAGE_SIZE,
    render_example,
    validate_image_size,
)
from cgc_tf.data.cluttered_digits.cluttered_digits import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_SEED,
    HOLDOUT_EVERY,
    PLACEMENTS_PER_DIGIT,
    ClutteredDigits,
    ClutteredDigitsConfig,
    config_for_size,
    generate_example,
    holdout_source_indices,
    load_source_digits,
    split_source_indices,
)

DATASET_NAME = "cluttered_digits"

__all__ = [
    "DATASET_NAME",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_SEED",
    "HOLDOUT_EVERY",
    "MIN_IMAGE_SIZE",
    "PLACEMENTS_PER_DIGIT",
    "ClutteredDigits",
    "ClutteredDigitsConfig",
    "builder",
    "canvas",
    "config_for_size",
    "generate_example",
    "holdout_source_indices",
    "load",
    "load_source_digits",
    "render_example",
    "split_source_indices",
    "validate_image_size",
]


def builder(data_dir=None, image_size=DEFAULT_IMAGE_SIZE, holdout=False):
    """Returns the prepared `cluttered_digits` builder for `image_size`.

    The first call for a given `data_dir` and size renders and writes the
    splits (about 9 s of CPU time for 48x48); later calls reuse them. Processes
    that prepare the same config at the same time all succeed.

    Args:
      data_dir: str or None, the tfds data directory; None means the tfds
        default (`~/tensorflow_datasets` or `$TFDS_DATA_DIR`).
      image_size: int >= 16, the canvas side. 48 and 64 use the predefined
        configs `size48` / `size64`; any other size uses a custom config named
        f"size{image_size}".
      holdout: bool; True prepares the holdout config f"size{image_size}_holdout"
        (splits train / validation / test, see README.md).

    Returns:
      A `ClutteredDigits` builder whose data is ready for `as_dataset`.

    Raises:
      ValueError: if `image_size` is not an integer >= 16.
    """
    config = config_for_size(image_size, holdout)
    dataset_builder = ClutteredDigits(config=config, data_dir=data_dir)
    try:
        dataset_builder.download_and_prepare()
    except FileExistsError:
        # Two processes started on a fresh data_dir (e.g. runs launched together)
        # prepare the same config; tfds renames each one's complete copy into
        # place, and the later rename fails. The earlier copy is complete: read it.
        dataset_builder = ClutteredDigits(config=config, data_dir=data_dir)
        if not dataset_builder.is_prepared():
            raise
    return dataset_builder


def load(split, data_dir=None, image_size=DEFAULT_IMAGE_SIZE, holdout=False):
    """Loads a split of `cluttered_digits`, preparing the data on first use.

    Args:
      split: str, a tfds split spec such as "train", "test" or "train[:10%]".
      data_dir: str or None, the tfds data directory (None: the tfds default).
      image_size: int >= 16, the canvas side S.
      holdout: bool, read the holdout config (splits train / validation / test).

    Returns:
      A tf.data.Dataset of feature dicts, in the stored (deterministic) order:
      "image" uint8 [S, S, 3], "label" int64 [], "bbox" float32 [4]
      (normalised [ymin, xmin, ymax, xmax] of the digit's ink) and
      "source_index" int32 [].

    Raises:
      ValueError: if `image_size` is not an integer >= 16.
    """
    return builder(data_dir=data_dir, image_size=image_size, holdout=holdout).as_dataset(
        split=split
    )
