"""What every dataset source returns: `DatasetInfo`, undecoded `Records`, the shard check.

Record dicts, before decoding: "name" (tf.string: the file path, or the tfds
record id `tfds_id`), "label" (int64), "encoded" (tf.string, tfds only: folders
are read in the decode step, which catches unreadable files) and, with boxes,
"bbox" (float32 [N, 4], normalised [ymin, xmin, ymax, xmax]). docs/data.md
describes the sources.
"""

import dataclasses
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

# Preferred evaluation splits, in order.
EVAL_SPLITS = ("validation", "val", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the pipelines and the model need to know about a dataset.

    Attributes:
      name: the `dataset` string as given.
      num_classes: int.
      class_names: tuple of str, indexed by label id.
      splits: dict split name -> number of examples (folders: image files listed).
      train_split: the default training split.
      eval_split: the default evaluation split ("validation", "val" or "test"), or
        None if the dataset has none.
      has_bounding_boxes: whether `eval_dataset(..., with_boxes=True)` works.
    """

    name: str
    num_classes: int
    class_names: tuple
    splits: dict
    train_split: str
    eval_split: Optional[str]
    has_bounding_boxes: bool


@dataclasses.dataclass(frozen=True)
class Records:
    """Undecoded records of one split.

    Attributes:
      read: callable `(shuffle_files=False, seed=0) -> tf.data.Dataset` of record
        dicts (this module's docstring). `shuffle_files=True` shuffles the record
        order, seeded and differently every epoch: all paths for folders, the
        record files for tfds.
      num_examples: int, the number of records (before any decoding failure).
      decoded_bytes: estimated total bytes of the decoded uint8 images, or None
        when unknown (the dataset is then treated as large: not cached).
      validation_decodes: int, images decoded in full by the validation pass
        that built these records (folders of at most
        `decode.FULL_VALIDATION_MAX_BYTES`; 0 for tfds).
    """

    read: Callable[..., tf.data.Dataset]
    num_examples: int
    decoded_bytes: Optional[int]
    validation_decodes: int = 0


def check_shard(num_shards, shard_index):
    """Raises ValueError unless 0 <= shard_index < num_shards (ints)."""
    for name, value, minimum in (("num_shards", num_shards, 1), ("shard_index", shard_index, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    if shard_index >= num_shards:
        raise ValueError(f"shard_index={shard_index} must be < num_shards={num_shards}")

