"""Input pipelines of `cgc_tf`: tfds by name, image folders, views, subsets.

`train_dataset`, `eval_dataset`, `unlabeled_dataset`, `semi_supervised_dataset` give
batches of float32 images [B, S, S, 3] in [0, 1] and int32 labels [B] for a dataset
name ("cluttered_digits", "elpv...", a tfds name prepared in `data_dir`: never
downloaded, or "folder:/root"). Importing registers the `cluttered_digits` and `elpv`
tfds builders. The public names and the sources, decoding and views: docs/data.md.
"""

from cgc_tf.data import cluttered_digits
from cgc_tf.data import decode
from cgc_tf.data import elpv
from cgc_tf.data import pipeline
from cgc_tf.data import prepare
from cgc_tf.data import sources
from cgc_tf.data import views
from cgc_tf.data.decode import CorruptImageCounter
from cgc_tf.data.pipeline import eval_dataset
from cgc_tf.data.pipeline import InputStats
from cgc_tf.data.pipeline import labelled_subset
from cgc_tf.data.pipeline import semi_supervised_dataset
from cgc_tf.data.pipeline import train_dataset
from cgc_tf.data.pipeline import unlabeled_dataset
from cgc_tf.data.prepare import prepare_folder
from cgc_tf.data.sources import dataset_info
from cgc_tf.data.sources import DatasetInfo

__all__ = [
    "CorruptImageCounter",
    "DatasetInfo",
    "InputStats",
    "cluttered_digits",
    "dataset_info",
    "decode",
    "elpv",
    "eval_dataset",
    "labelled_subset",
    "pipeline",
    "prepare",
    "prepare_folder",
    "semi_supervised_dataset",
    "sources",
    "train_dataset",
    "unlabeled_dataset",
    "views",
]
