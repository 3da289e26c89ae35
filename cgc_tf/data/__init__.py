"""Input pipelines of `cgc_tf`: tfds by name, image folders, views, subsets.

Dataset names: "cluttered_digits" (embedded), "elpv" (+ variants), a tfds name
prepared in `data_dir` (never downloaded) or "folder:/root"; docs/data.md
describes the sources, decoding, pipelines and views.

Public API:
  DatasetInfo, dataset_info     classes, splits, bounding boxes of a dataset.
  train_dataset                 ({"image", "classification_view"}, label) batches.
  eval_dataset                  ({"image"}, label) batches, or dicts with boxes.
  labelled_subset               the examples of a per-class subset (examples_per_class).
  unlabeled_dataset             {"image"} batches.
  semi_supervised_dataset       ((x_l, y_l), x_u) with the unlabelled stream repeated.
  CorruptImageCounter           distinct corrupt files skipped (skip_corrupt_images=True).
  InputStats                    images a (sharded) training pipeline decoded.
  prepare_folder                an image folder written once as sharded tfds records
                                (the `cgc-prepare` command), then read by name.

Importing this package registers the `cluttered_digits` and `elpv` tfds builders.
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
