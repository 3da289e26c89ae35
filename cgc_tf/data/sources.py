"""Dataset names resolved to sources: `resolve(dataset)` and `dataset_info(dataset)`.

A `dataset` is "cluttered_digits" / "cluttered_digits_holdout" (the embedded
builder), "elpv" / "elpv_mono" / "elpv_poly" (+ "_holdout"), a tensorflow-datasets
name prepared in `data_dir` (never downloaded; also folders written by
`cgc-prepare`), or "folder:/root". Every source has `info` (`DatasetInfo`) and
`records(split, ...)` (undecoded `Records`, records.py). docs/data.md describes
each kind.
"""

from cgc_tf import config
from cgc_tf.data import cluttered_digits
from cgc_tf.data import elpv
from cgc_tf.data.folder_source import FolderSource
from cgc_tf.data.records import DatasetInfo
from cgc_tf.data.records import Records
from cgc_tf.data.records import check_shard
from cgc_tf.data.tfds_source import TfdsSource
from cgc_tf.data.tfds_source import prepared_builder

__all__ = [
    "DatasetInfo",
    "FolderSource",
    "Records",
    "TfdsSource",
    "check_shard",
    "dataset_info",
    "resolve",
]


def resolve(dataset, data_dir=None, image_size=48):
    """The source object for a `dataset` name (this module's docstring).

    Args:
      dataset: "cluttered_digits", "cluttered_digits_holdout" (its holdout
        config: train / validation / test), a tfds name, or "folder:/root".
      data_dir: tfds data directory (None: the tfds default); unused by folders.
      image_size: int, selects the `cluttered_digits` config.

    Returns:
      A `TfdsSource` or `FolderSource` with an `info` attribute (`DatasetInfo`).

    Raises:
      ValueError: unknown name, unprepared tfds dataset, bad folder layout.
    """
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(
            f"dataset={dataset!r} must be {config.EMBEDDED_DATASET!r}, a tensorflow-datasets "
            f"name or '{config.FOLDER_PREFIX}/path/to/root'"
        )
    if dataset in config.ELPV_DATASETS:
        return TfdsSource(elpv.builder(data_dir=data_dir, name=dataset), dataset)
    if dataset in config.EMBEDDED_DATASETS:
        builder = cluttered_digits.builder(
            data_dir=data_dir,
            image_size=image_size,
            holdout=dataset == config.HOLDOUT_DATASET,
        )
        return TfdsSource(builder, dataset)
    if dataset.startswith(config.FOLDER_PREFIX):
        return FolderSource(dataset)
    return TfdsSource(prepared_builder(dataset, data_dir), dataset)


def dataset_info(dataset, data_dir=None, image_size=48):
    """Classes, splits and box availability of a dataset.

    Args:
      dataset: "cluttered_digits", a prepared tfds name, or "folder:/root".
      data_dir: tfds data directory (None: the tfds default).
      image_size: int; for `cluttered_digits`, the config to prepare and read.

    Returns:
      `DatasetInfo`.

    Raises:
      ValueError: unknown name, unprepared tfds dataset or bad folder layout.
    """
    return resolve(dataset, data_dir, image_size).info
