"""The `elpv` solar-cell dataset (a tensorflow-datasets builder; optional extra).

Importing registers the `elpv` builder with tfds; preparing it needs the optional
package `elpv-dataset` (`pip install -e ".[elpv]"`). `load(split, name="elpv_mono")`
gives dicts with `image` uint8 [300, 300, 1] and `label` int64 (defective vs
functional). Names, configs and splits: README.md beside this file.
"""

from cgc_tf.data.elpv import elpv as _elpv
from cgc_tf.data.elpv.elpv import (
    CELL_TYPES,
    CLASS_NAMES,
    DEFAULT_SEED,
    DEFECTIVE_THRESHOLD,
    IMAGE_SIDE,
    INSTALL_HINT,
    PROBABILITY_LEVELS,
    TEST_FRACTION,
    VALIDATION_FRACTION,
    Cell,
    Elpv,
    ElpvConfig,
    MissingSourceError,
    check_image,
    config_for,
    probability_level,
    read_cells,
    source_directory,
    split_indices,
)

DATASET_NAME = "elpv"

__all__ = [
    "CELL_TYPES",
    "CLASS_NAMES",
    "DATASET_NAME",
    "DEFAULT_SEED",
    "DEFECTIVE_THRESHOLD",
    "IMAGE_SIDE",
    "INSTALL_HINT",
    "PROBABILITY_LEVELS",
    "TEST_FRACTION",
    "VALIDATION_FRACTION",
    "Cell",
    "Elpv",
    "ElpvConfig",
    "MissingSourceError",
    "builder",
    "check_image",
    "config_for",
    "config_for_name",
    "load",
    "probability_level",
    "read_cells",
    "source_directory",
    "split_indices",
]


def config_for_name(name):
    """The `ElpvConfig` of a dataset name such as "elpv_mono_holdout".

    Raises:
      ValueError: if `name` is not elpv[_mono|_poly][_holdout].
    """
    rest = name[len(DATASET_NAME):] if isinstance(name, str) and name.startswith(DATASET_NAME) else None
    holdout = rest is not None and rest.endswith("_holdout")
    if holdout:
        rest = rest[: -len("_holdout")]
    cell_type = {"": "all", "_mono": "mono", "_poly": "poly"}.get(rest)
    if cell_type is None:
        raise ValueError(
            f"dataset={name!r} is not an elpv name: elpv, elpv_mono or elpv_poly, "
            "each optionally with the suffix _holdout"
        )
    return config_for(cell_type, holdout)


def builder(data_dir=None, name=DATASET_NAME):
    """Returns the prepared `elpv` builder of a dataset name.

    The first call for a given `data_dir` and config copies the images of the
    installed elpv-dataset package into tfds record files (about 90 MB for
    `elpv`); later calls reuse them and no longer need the package.

    Args:
      data_dir: str or None, the tfds data directory (None: the tfds default).
      name: "elpv", "elpv_mono" or "elpv_poly", optionally + "_holdout".

    Returns:
      An `Elpv` builder whose data is ready for `as_dataset`.

    Raises:
      MissingSourceError: the data is not prepared and elpv-dataset is not installed.
      ValueError: unknown `name`.
    """
    config = config_for_name(name)
    dataset_builder = Elpv(config=config, data_dir=data_dir)
    if dataset_builder.is_prepared():
        return dataset_builder
    _elpv.source_directory()  # Fails first, in one line, without the package.
    try:
        dataset_builder.download_and_prepare()
    except FileExistsError:
        # As for cluttered_digits: a concurrent process prepared the same config.
        dataset_builder = Elpv(config=config, data_dir=data_dir)
        if not dataset_builder.is_prepared():
            raise
    return dataset_builder


def load(split, name=DATASET_NAME, data_dir=None):
    """Loads a split of an elpv dataset name, preparing it on first use.

    Args:
      split: str, a tfds split spec ("train", "test", "validation" for holdout names).
      name: "elpv", "elpv_mono" or "elpv_poly", optionally + "_holdout".
      data_dir: str or None, the tfds data directory.

    Returns:
      tf.data.Dataset of feature dicts in stored order: "image" uint8 [300, 300, 1],
      "label" int64 [] (0 functional, 1 defective), "defect_probability" float32
      [], "cell_type" int64 [] (0 mono, 1 poly), "cell_id" tf.string [].
    """
    return builder(data_dir=data_dir, name=name).as_dataset(split=split)
