"""A prepared tensorflow-datasets builder as a dataset source; never downloads.

`prepared_builder(name, data_dir)` finds a tfds dataset prepared in `data_dir`
(or raises a `ValueError` that says how to prepare it); `TfdsSource` reads its
`DatasetInfo` and undecoded `records` (records.py), with boxes where the
dataset has a `BBoxFeature`.
"""

import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cgc_tf import config
from cgc_tf.data import decode
from cgc_tf.data.records import DatasetInfo
from cgc_tf.data.records import EVAL_SPLITS
from cgc_tf.data.records import Records
from cgc_tf.data.records import check_shard

# Decoded examples sampled to estimate the decoded size of tfds images whose
# shape is not fixed by the dataset.
_SIZE_SAMPLE = 16
_LABEL_BATCH = 4096


def prepared_builder(name, data_dir):
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
        eval_split = next((s for s in EVAL_SPLITS if s in splits), None)
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
        """Records of `split` (record dicts: records.py).

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
