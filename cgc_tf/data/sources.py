"""Dataset sources: names resolved to labelled example records.

`dataset` names (docs/architecture.md):
- `cluttered_digits`: the embedded tfds builder, prepared offline on first use in
  `data_dir`; `image_size` selects (or creates) its config.
- `cluttered_digits_holdout`: its holdout config, for tuning without the test
  split: splits `train` (6 of every 7 train digits), `validation` (the 7th) and
  `test`; training validates and reports on `validation`.
- `elpv`, `elpv_mono`, `elpv_poly` (+ `_holdout`): the solar-cell builder
  (`cgc_tf/data/elpv`), prepared offline from the optional package elpv-dataset;
  without it, a one-line error says how to install it.
- any tensorflow-datasets name, already prepared in `data_dir`. Nothing is ever
  downloaded: an unprepared dataset raises a `ValueError` saying where it was
  looked for and how to prepare it (including manual-download instructions).
  This includes image folders written as record files by `cgc-prepare`
  (`cgc_tf.data.prepare`), read by their name without their builder class.
- `folder:/root` with `root/train/<class>/*` and `root/val/<class>/*`,
  `root/validation/<class>/*` or `root/test/<class>/*`. Class ids are the sorted
  class folder names of `train`; the other splits reuse them. Listing and the
  behaviour with unusual files are documented in `cgc_tf/data/decode.py`; here:
  hidden entries are ignored, class folders are searched recursively and
  symlinks followed, an empty class folder in `train` is an error naming it (the
  model would have a class it can never learn), an empty class folder in another
  split only logs a warning, a class folder of another split that `train` lacks is
  an error naming it, and files directly in a split folder are ignored with a
  warning.

Records are `tf.data` dicts before decoding: `name` (tf.string: the file path, or
the tfds record id `tfds_id`), `label` (int64), `encoded` (tf.string, tfds only:
folders are read in the decode step so that unreadable files are caught there),
and with boxes `bbox` (float32 [N, 4], normalised [ymin, xmin, ymax, xmax]).

We list folders ourselves instead of using `tfds.folder_dataset.ImageFolder`:
ImageFolder decodes with a fixed 3-channel `tfds.features.Image`, which fails on
grayscale and 16-bit files, cannot name or skip a corrupt file, and has no
validation pass.
"""

import collections
import dataclasses
import os
from typing import Callable, Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cgc_tf import config
from cgc_tf.data import cluttered_digits
from cgc_tf.data import decode
from cgc_tf.data import elpv

# Preferred evaluation splits, in order.
_EVAL_SPLITS = ("validation", "val", "test")
_FOLDER_SPLITS = ("train", "val", "validation", "test")
# Decoded examples sampled to estimate the decoded size of tfds images whose
# shape is not fixed by the dataset.
_SIZE_SAMPLE = 16
_LABEL_BATCH = 4096


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
        dicts (see the module docstring). `shuffle_files=True` shuffles the record
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


# ----------------------------------------------------------------------------- tfds


def _prepared_builder(name, data_dir):
    """tfds builder for a prepared dataset; never downloads."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"dataset={name!r} is not {config.EMBEDDED_DATASET!r}, "
            f"'{config.FOLDER_PREFIX}/path/to/root' or a tensorflow-datasets name "
            f"({str(error).splitlines()[0]}; an image folder written by `cgc-prepare "
            f"--name={name}` is read from the --data_dir it was written into, once "
            "complete)"
        ) from None
    if not builder.is_prepared():
        root = data_dir if data_dir else tfds.core.constants.DATA_DIR
        message = (
            f"dataset={name!r} is not prepared in data_dir={root!r} (nothing at "
            f"{builder.data_dir}). Nothing is downloaded at run time: prepare it once "
            f"with `tfds build {name} --data_dir={root}` (on a machine with the "
            "source files or internet access) and copy the data_dir here."
        )
        if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
            message += (
                f" {name} needs files downloaded by hand: put them in "
                f"{os.path.join(root, 'downloads', 'manual')} (or pass --manual_dir to "
                "`tfds build`). Its instructions: "
                + " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
            )
        raise ValueError(message)
    return builder


def _box_spec(features):
    """Where the boxes are: (key,) for a BBoxFeature, (key, sub_key) in a Sequence."""
    for key, feature in features.items():
        if isinstance(feature, tfds.features.BBoxFeature):
            return (key,)
    for key, feature in features.items():
        if not isinstance(feature, tfds.features.Sequence):
            continue
        inner = feature.feature
        if isinstance(inner, tfds.features.BBoxFeature):
            return (key,)
        if isinstance(inner, tfds.features.FeaturesDict):
            for sub_key, sub_feature in inner.items():
                if isinstance(sub_feature, tfds.features.BBoxFeature):
                    return (key, sub_key)
    return None


class TfdsSource:
    """A prepared tensorflow-datasets builder (including `cluttered_digits`)."""

    def __init__(self, builder, name):
        self._builder = builder
        features = builder.info.features
        keys = builder.info.supervised_keys
        if isinstance(keys, tuple) and len(keys) >= 2 and all(isinstance(k, str) for k in keys[:2]):
            self._image_key, self._label_key = keys[0], keys[1]
        else:
            self._image_key, self._label_key = "image", "label"
        for role, key in (("image", self._image_key), ("label", self._label_key)):
            if key not in features:
                raise ValueError(
                    f"dataset={name!r} has no {role} feature {key!r} (features: "
                    f"{sorted(features.keys())}); only image classification datasets "
                    "are supported"
                )
        if not isinstance(features[self._image_key], tfds.features.Image):
            raise ValueError(
                f"dataset={name!r}: feature {self._image_key!r} is "
                f"{type(features[self._image_key]).__name__}, expected an encoded "
                "tfds.features.Image"
            )
        label_feature = features[self._label_key]
        if not isinstance(label_feature, tfds.features.ClassLabel):
            raise ValueError(
                f"dataset={name!r}: label feature {self._label_key!r} is "
                f"{type(label_feature).__name__}, expected a tfds.features.ClassLabel"
            )
        self._box_spec = _box_spec(features)
        splits = {key: int(builder.info.splits[key].num_examples) for key in builder.info.splits}
        train_split = "train" if "train" in splits else max(splits, key=splits.get)
        eval_split = next((s for s in _EVAL_SPLITS if s in splits), None)
        self.info = DatasetInfo(
            name=name,
            num_classes=int(label_feature.num_classes),
            class_names=tuple(label_feature.names),
            splits=splits,
            train_split=train_split,
            eval_split=eval_split,
            has_bounding_boxes=self._box_spec is not None,
        )

    def _num_examples(self, split):
        # tfds split specs such as "train[:10%]" are accepted.
        try:
            return int(self._builder.info.splits[split].num_examples)
        except (KeyError, ValueError) as error:
            raise ValueError(
                f"split={split!r} is not a split of dataset {self.info.name!r} ({error}); "
                f"its splits are {sorted(self.info.splits)}"
            ) from None

    def _read(self, split, wanted, shuffle_files=False, seed=None):
        # Images stay encoded here: `cgc_tf.data.decode` decodes them robustly.
        skip = {self._image_key: tfds.decode.SkipDecoding()} if self._image_key in wanted else None
        decoders = tfds.decode.PartialDecoding(wanted, decoders=skip)
        # Record files are read by a parallel interleave (AUTOTUNE), whose order is
        # deterministic: tfds only relaxes it when shuffling without a seed.
        read_config = tfds.ReadConfig(
            add_tfds_id=True,
            shuffle_seed=seed if shuffle_files else None,
            num_parallel_calls_for_interleave_files=tf.data.AUTOTUNE,
        )
        return self._builder.as_dataset(
            split=split, shuffle_files=shuffle_files, decoders=decoders, read_config=read_config
        )

    def label_index(self, split):
        """(names, labels) of `split` in stored order: tfds ids and int64 labels."""
        self._num_examples(split)
        dataset = self._read(split, {self._label_key: True}).batch(_LABEL_BATCH)
        names, labels = [], []
        for batch in dataset.as_numpy_iterator():
            names.extend(name.decode("utf-8") for name in batch["tfds_id"])
            labels.append(batch[self._label_key])
        labels = np.concatenate(labels) if labels else np.zeros([0], np.int64)
        return np.asarray(names, dtype=object), labels.astype(np.int64)

    def _decoded_bytes(self, split, num_examples, min_short_side):
        height, width = self._builder.info.features[self._image_key].shape[:2]
        if height is not None and width is not None:
            return num_examples * height * width * 3
        sample = self._read(split, {self._image_key: True}).take(_SIZE_SAMPLE)
        sizes = []
        for example in sample:
            image, ok = decode.try_decode(
                encoded=example[self._image_key], min_short_side=min_short_side
            )
            if ok:
                sizes.append(int(tf.size(image)))
        if not sizes:
            return None
        return int(np.mean(sizes) * num_examples)

    def records(self, split, names=None, with_boxes=False, labeled=True,
                skip_corrupt_images=False, counter=None, min_short_side=None,
                num_shards=1, shard_index=0):
        """Records of `split` (see the module docstring).

        Args:
          split: a split name or tfds split spec.
          names: optional sequence of tfds ids to keep (a per-class subset).
          with_boxes: add `bbox` float32 [N, 4].
          labeled: add `label`.
          skip_corrupt_images, counter: unused (tfds records are checked when
            decoded); accepted so every source has the same signature.
          min_short_side: decoding hint used to estimate the decoded size.
          num_shards, shard_index: keep only shard `shard_index` of `num_shards`
            disjoint shares of the records, chosen before anything is decoded:
            without `names`, `tfds.even_splits` (contiguous record ranges whose
            sizes differ by at most one; tfds reads only the record files, and
            the records within them, that the range covers); with `names`,
            every `num_shards`-th name (the other records are read and dropped
            undecoded).

        Returns:
          `Records`.
        """
        del skip_corrupt_images, counter
        check_shard(num_shards, shard_index)
        if num_shards > 1 and names is None:
            # Record ranges rather than tfds's file-level sharding
            # (ReadConfig.input_context): that needs at least one record file per
            # worker and gives unequal shares when files hold different counts.
            split = tfds.even_splits(split, n=num_shards)[shard_index]
        if names is not None:
            names = list(names)[shard_index::num_shards]
        num_examples = self._num_examples(split)
        if with_boxes and self._box_spec is None:
            raise ValueError(f"dataset {self.info.name!r} has no bounding boxes")
        wanted = {self._image_key: True}
        if labeled:
            wanted[self._label_key] = True
        if with_boxes:
            key = self._box_spec[0]
            wanted[key] = {self._box_spec[1]: True} if len(self._box_spec) == 2 else True
        box_spec, image_key, label_key = self._box_spec, self._image_key, self._label_key

        def to_record(example):
            record = {"name": example["tfds_id"], "encoded": example[image_key]}
            if labeled:
                record["label"] = tf.cast(example[label_key], tf.int64)
            if with_boxes:
                boxes = example[box_spec[0]]
                if len(box_spec) == 2:
                    boxes = boxes[box_spec[1]]
                record["bbox"] = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
            return record

        keep = None
        if names is not None:
            keep = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(
                    tf.constant(list(names), tf.string), tf.ones([len(names)], tf.int64)
                ),
                default_value=0,
            )
            num_examples = len(names)

        def read(shuffle_files=False, seed=0):
            dataset = self._read(split, wanted, shuffle_files, seed).map(
                to_record, num_parallel_calls=tf.data.AUTOTUNE
            )
            if keep is not None:
                dataset = dataset.filter(lambda record: keep.lookup(record["name"]) > 0)
                dataset = dataset.apply(tf.data.experimental.assert_cardinality(num_examples))
            return dataset

        return Records(read, num_examples, self._decoded_bytes(split, num_examples, min_short_side))


# --------------------------------------------------------------------------- folders


def _list_images(directory):
    """Image files under `directory`, recursively, following symlinks.

    Returns:
      (sorted list of paths, Counter of ignored files by extension).
    """
    files, ignored, visited = [], collections.Counter(), set()
    for current, subdirectories, filenames in os.walk(directory, followlinks=True):
        real = os.path.realpath(current)
        if real in visited:  # A symlink cycle: do not walk it again.
            subdirectories[:] = []
            continue
        visited.add(real)
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for filename in filenames:
            if not filename.startswith(".") and decode.has_image_extension(filename):
                files.append(os.path.join(current, filename))
            else:
                ignored[os.path.splitext(filename)[1].lower() or filename] += 1
    return sorted(files), ignored


def _warn_ignored(directory, ignored):
    if ignored:
        summary = ", ".join(f"{key}: {count}" for key, count in sorted(ignored.items()))
        logging.warning(
            "Ignored %d non-image files in %s (by extension: %s); image extensions are %s",
            sum(ignored.values()), directory, summary, ", ".join(decode.IMAGE_EXTENSIONS),
        )


class FolderSource:
    """An image folder `root/<split>/<class>/*`."""

    def __init__(self, dataset):
        root = dataset[len(config.FOLDER_PREFIX):]
        if not root or not os.path.isdir(root):
            raise ValueError(
                f"dataset={dataset!r}: image folder {root!r} does not exist; expected "
                f"'{config.FOLDER_PREFIX}/root' with root/train/<class>/* and "
                "root/val/<class>/* (or root/test/<class>/*)"
            )
        self._dataset = dataset
        self._root = root
        self._listings = {}
        self._info = None
        self._class_names = None

    @property
    def root(self):
        """str: the folder's root directory."""
        return self._root

    @property
    def info(self):
        """`DatasetInfo`; lists every split on first use.

        Raises:
          ValueError: if root/train is missing or has no class folders, or a split's
            layout is invalid (see the module docstring).
        """
        if self._info is not None:
            return self._info
        class_names = self._classes()
        split_names = [s for s in _FOLDER_SPLITS if os.path.isdir(os.path.join(self._root, s))]
        splits = {split: len(self._listing(split)[0]) for split in split_names}
        self._info = DatasetInfo(
            name=self._dataset,
            num_classes=len(class_names),
            class_names=class_names,
            splits=splits,
            train_split="train",
            eval_split=next((s for s in _EVAL_SPLITS if s in splits), None),
            has_bounding_boxes=False,
        )
        return self._info

    def _classes(self):
        """The class names: the sorted class folders of root/train."""
        if self._class_names is not None:
            return self._class_names
        train = os.path.join(self._root, "train")
        if not os.path.isdir(train):
            raise ValueError(
                f"dataset={self._dataset!r}: {train!r} does not exist; expected "
                "root/train/<class>/* (and root/val/<class>/* or root/test/<class>/*)"
            )
        self._class_names = tuple(self._class_folders("train"))
        if not self._class_names:
            raise ValueError(f"dataset={self._dataset!r}: {train!r} has no class folders")
        return self._class_names

    def _class_folders(self, split):
        directory = os.path.join(self._root, split)
        with os.scandir(directory) as entries:
            return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())

    def _listing(self, split):
        """(paths, labels) of a labelled split, sorted by class then path."""
        if split in self._listings:
            return self._listings[split]
        directory = os.path.join(self._root, split)
        if not os.path.isdir(directory):
            raise ValueError(
                f"split={split!r} is not a split of dataset {self._dataset!r}: "
                f"{directory!r} does not exist"
            )
        class_folders = self._class_folders(split)
        class_ids = {name: index for index, name in enumerate(self._classes())}
        unknown = [name for name in class_folders if name not in class_ids]
        if unknown:
            raise ValueError(
                f"dataset={self._dataset!r}: class folders {unknown} of split {split!r} are "
                f"not in the train split, whose classes are {list(self._classes())}"
            )
        paths, labels, ignored, empty = [], [], collections.Counter(), []
        with os.scandir(directory) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and not entry.is_dir():
                    ignored[f"(not in a class folder) {entry.name}"] += 1
        for name in class_folders:
            files, class_ignored = _list_images(os.path.join(directory, name))
            ignored.update(class_ignored)
            if not files:
                empty.append(os.path.join(directory, name))
            paths.extend(files)
            labels.extend([class_ids[name]] * len(files))
        _warn_ignored(directory, ignored)
        if empty and split == "train":
            raise ValueError(
                f"dataset={self._dataset!r}: class folders without image files in the "
                f"train split: {empty} (remove them or add images)"
            )
        if empty:
            logging.warning("Class folders without image files in split %r: %s", split, empty)
        self._listings[split] = (paths, np.asarray(labels, np.int64))
        return self._listings[split]

    def label_index(self, split):
        """(paths, labels) of `split` in listing order."""
        paths, labels = self._listing(split)
        return np.asarray(paths, dtype=object), labels

    def records(self, split, names=None, with_boxes=False, labeled=True,
                skip_corrupt_images=False, counter=None, min_short_side=None,
                num_shards=1, shard_index=0):
        """Validated records of `split`; see `TfdsSource.records` for the arguments.

        With `num_shards` > 1 the sorted file list is split first (every
        `num_shards`-th file, from `shard_index`), so the validation pass and the
        pipeline only open this shard's files.
        Runs the validation pass of `cgc_tf.data.decode` on the selected files:
        corrupt files raise a ValueError naming them, or with
        `skip_corrupt_images=True` are dropped and recorded in `counter`. For an
        unlabelled read (`labeled=False`) `split` may be None (the root itself) and
        the split folder need not contain class folders.
        """
        if with_boxes:
            raise ValueError(f"dataset {self._dataset!r} has no bounding boxes")
        if labeled:
            paths, labels = self._listing(split)
        else:
            directory = self._root if split is None else os.path.join(self._root, split)
            if not os.path.isdir(directory):
                raise ValueError(
                    f"split={split!r} is not a folder of dataset {self._dataset!r}: "
                    f"{directory!r} does not exist"
                )
            paths, ignored = _list_images(directory)
            _warn_ignored(directory, ignored)
            labels = np.full([len(paths)], -1, np.int64)
        if names is not None:
            keep = set(names)
            selected = [i for i, path in enumerate(paths) if path in keep]
            paths, labels = [paths[i] for i in selected], labels[selected]
        check_shard(num_shards, shard_index)
        paths, labels = list(paths)[shard_index::num_shards], labels[shard_index::num_shards]
        total_bytes = decode.total_file_bytes(paths)
        full_decode = total_bytes <= decode.FULL_VALIDATION_MAX_BYTES
        problems, shapes = decode.validate_files(paths, full_decode, min_short_side)
        if problems:
            description = decode.describe_problems(problems)
            if not skip_corrupt_images:
                raise ValueError(
                    f"{len(problems)} corrupt image file(s) in split {split!r} of "
                    f"{self._dataset!r}:\n{description}\nFix or remove them, or pass "
                    "skip_corrupt_images=True to skip and count them."
                )
            logging.warning(
                "Skipping %d corrupt image file(s) in split %r of %r:\n%s",
                len(problems), split, self._dataset, description,
            )
            if counter is not None:
                for path in problems:
                    counter.record(path)
            kept = [i for i, path in enumerate(paths) if path not in problems]
            paths, labels = [paths[i] for i in kept], labels[kept]
        decoded_bytes = sum(h * w * 3 for h, w in shapes.values()) if full_decode else None
        fields = {"name": tf.constant(paths, tf.string, shape=[len(paths)])}
        if labeled:
            fields["label"] = tf.constant(labels, tf.int64, shape=[len(paths)])

        def read(shuffle_files=False, seed=0):
            dataset = tf.data.Dataset.from_tensor_slices(fields)
            if shuffle_files and paths:
                # Paths are cheap: shuffle them all.
                dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
            return dataset

        return Records(read, len(paths), decoded_bytes, validation_decodes=len(shapes))


# ---------------------------------------------------------------------------- public


def resolve(dataset, data_dir=None, image_size=48):
    """The source object for a `dataset` name (see the module docstring).

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
    return TfdsSource(_prepared_builder(dataset, data_dir), dataset)


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
