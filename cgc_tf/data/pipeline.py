"""The public tf.data builders: training, evaluation, unlabelled, semi-supervised.

Each resolves the dataset name (`sources`), reads records, decodes in parallel
(`decode`), computes the views (`views`), batches and prefetches; T is applied in
the model, not here. Images are float32 [B, S, S, 3] in [0, 1]. Caching,
sharding and randomness rules: docs/data.md (pipelines).
"""

import numbers
import os

import numpy as np
import tensorflow as tf

from cgc_tf.data import decode
from cgc_tf.data import sources
from cgc_tf.data import views

CACHE_MAX_BYTES = 200 * 2**20


def _check_int(name, value, minimum, allow_none=False):
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name}={value!r} must be {allowed}")


def _counter_for(skip_corrupt_images, corrupt_image_counter):
    if not isinstance(skip_corrupt_images, bool):
        raise ValueError(f"skip_corrupt_images={skip_corrupt_images!r} must be True or False")
    if corrupt_image_counter is not None and not isinstance(
        corrupt_image_counter, decode.CorruptImageCounter
    ):
        raise ValueError(
            f"corrupt_image_counter={corrupt_image_counter!r} must be a "
            "cgc_tf.data.CorruptImageCounter or None"
        )
    if skip_corrupt_images and corrupt_image_counter is None:
        # Skipped files are still logged; the caller just cannot read the count.
        return decode.CorruptImageCounter()
    return corrupt_image_counter


class InputStats:
    """What one input pipeline decoded, for `model_dir/input_stats/worker-<index>.json`.

    Pass one to `train_dataset` (and `unlabeled_dataset`): every image the
    pipeline decodes is counted as it happens (a counter variable incremented
    in the tf.data decode step, repeated epochs included), and so are the full
    decodes of a folder's validation pass. Create it outside any
    `tf.distribute` strategy scope: its counter must be a plain local variable.

    Attributes:
      examples_per_epoch: int, the labelled examples in this pipeline's share
        of the training split (set by `train_dataset`).
      num_shards, shard_index: the share this pipeline read (set by `train_dataset`).
    """

    def __init__(self):
        if tf.distribute.has_strategy():
            raise ValueError(
                "InputStats() must be created outside a tf.distribute strategy scope "
                f"(inside {type(tf.distribute.get_strategy()).__name__}'s scope its counter "
                "would become a distributed variable)"
            )
        self._decoded = tf.Variable(0, dtype=tf.int64, trainable=False, name="images_decoded")
        self._validation_decodes = 0
        self.examples_per_epoch = 0
        self.num_shards, self.shard_index = 1, 0

    def count_decode(self):
        """Adds one decoded image (an op for tf.data graphs); returns the update."""
        return self._decoded.assign_add(1)

    def add_validation_decodes(self, records):
        """Counts the images a folder's validation pass decoded to build `records`."""
        self._validation_decodes += records.validation_decodes

    @property
    def images_decoded(self):
        """int: images decoded so far, by the pipeline and by validation passes."""
        return int(self._decoded.numpy()) + self._validation_decodes

    def as_dict(self):
        """JSON-serialisable dict: images_decoded, examples_per_epoch, num_shards, shard_index."""
        return {
            "images_decoded": self.images_decoded,
            "examples_per_epoch": self.examples_per_epoch,
            "num_shards": self.num_shards,
            "shard_index": self.shard_index,
        }


def _decode(records, skip_corrupt_images, counter, min_short_side, input_stats=None):
    """Maps record dicts to example dicts with `image` uint8 [H, W, 3]."""

    def decode_record(record):
        example = dict(record)
        encoded = example.pop("encoded", None)
        if input_stats is not None:
            with tf.control_dependencies([input_stats.count_decode()]):
                example["name"] = tf.identity(example["name"])
        if skip_corrupt_images:
            example["image"], ok = decode.decode_or_skip(
                example["name"], counter, encoded=encoded, min_short_side=min_short_side
            )
            return example, ok
        example["image"] = decode.decode_or_fail(
            example["name"], encoded=encoded, min_short_side=min_short_side
        )
        return example

    def decoded(example, ok):
        del example
        return ok

    def drop_flag(example, ok):
        del ok
        return example

    dataset = records.map(decode_record, num_parallel_calls=tf.data.AUTOTUNE)
    if skip_corrupt_images:
        dataset = dataset.filter(decoded).map(drop_flag)
    return dataset


def _should_cache(records):
    return records.decoded_bytes is not None and records.decoded_bytes <= CACHE_MAX_BYTES


def _decoded_examples(records, shuffle, seed, shuffle_buffer, skip_corrupt_images, counter,
                      min_short_side, input_stats=None):
    """Decoded (and, for training, shuffled) examples; cached when small."""
    if input_stats is not None:
        input_stats.add_validation_decodes(records)
    if _should_cache(records):
        # The cache is filled in stored order; shuffling happens after it.
        dataset = _decode(
            records.read(), skip_corrupt_images, counter, min_short_side, input_stats
        ).cache()
        if shuffle:
            buffer = max(1, min(shuffle_buffer, records.num_examples))
            dataset = dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        return dataset
    dataset = records.read(shuffle_files=shuffle, seed=seed)
    if shuffle:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return _decode(dataset, skip_corrupt_images, counter, min_short_side, input_stats)


def _per_class_subset(source, split, examples_per_class, seed):
    """Names of `examples_per_class` examples of every class, chosen by `seed`."""
    names, labels = source.label_index(split)
    chosen = np.zeros([len(names)], bool)
    for class_id, class_name in enumerate(source.info.class_names):
        candidates = np.flatnonzero(labels == class_id)
        if len(candidates) < examples_per_class:
            raise ValueError(
                f"examples_per_class={examples_per_class} but class {class_name!r} (id "
                f"{class_id}) has only {len(candidates)} examples in split {split!r} of "
                f"{source.info.name!r}"
            )
        # One stream per (seed, class): a class's subset does not depend on the others.
        rng = np.random.default_rng([seed, class_id])
        chosen[rng.choice(candidates, size=examples_per_class, replace=False)] = True
    return [str(name) for name in names[chosen]], labels[chosen]


def labelled_subset(dataset, examples_per_class, seed, image_size, data_dir=None, split=None):
    """The examples `train_dataset(..., examples_per_class, subset_seed=seed)` trains on.

    Depends on the dataset's content, `examples_per_class` and `seed` only.

    Args:
      dataset: "cluttered_digits", a prepared tfds name, or "folder:/root".
      examples_per_class: int N >= 1.
      seed: int >= 0, the subset seed.
      image_size: int S (selects the `cluttered_digits` config).
      data_dir: tfds data directory (None: the tfds default).
      split: split name; None: the train split.

    Returns:
      dict: "split" (str) and "examples" (class name -> the N example names of
      the class in stored order: tfds ids, or for a folder the file paths
      relative to its root).

    Raises:
      ValueError: as `train_dataset`, e.g. a class with fewer than N examples.
    """
    _check_int("examples_per_class", examples_per_class, 1)
    _check_int("seed", seed, 0)
    source = sources.resolve(dataset, data_dir, image_size)
    split = source.info.train_split if split is None else split
    names, labels = _per_class_subset(source, split, examples_per_class, seed)
    if isinstance(source, sources.FolderSource):
        # The subset is the same wherever the folder is mounted.
        names = [os.path.relpath(name, source.root) for name in names]
    examples = {class_name: [] for class_name in source.info.class_names}
    for name, label in zip(names, labels):
        examples[source.info.class_names[label]].append(name)
    return {"split": split, "examples": examples}


def _seeded(dataset, seed, num_shards=1, shard_index=0):
    """Zips a stateless seed int64 [2] to every element, different every epoch.

    Each shard gets its own stream, so the k-th example of every shard does
    not get the same classification-view crop.
    """
    stream_seed = seed * num_shards + shard_index
    seeds = tf.data.Dataset.random(seed=stream_seed, rerandomize_each_iteration=True).batch(2)
    return tf.data.Dataset.zip((dataset, seeds))


def train_dataset(dataset, batch_size, image_size, data_dir=None, split=None,
                  examples_per_class=None, seed=0, classification_view=True,
                  shuffle_buffer=10000, skip_corrupt_images=False, drop_remainder=True, *,
                  corrupt_image_counter=None, num_shards=1, shard_index=0, input_stats=None,
                  subset_seed=None):
    """The labelled training stream: one pass over the split per iteration.

    Args:
      dataset: "cluttered_digits", a prepared tfds name, or "folder:/root".
      batch_size: int B >= 1.
      image_size: int S >= 1, the model's input side.
      data_dir: tfds data directory (None: the tfds default).
      split: split name (tfds split specs allowed); None: the train split.
      examples_per_class: int N or None. If set, a deterministic subset of N
        examples per class (the same for the same subset seed, see
        `labelled_subset`). With skip_corrupt_images=True, chosen files found
        corrupt are dropped, not replaced.
      seed: int >= 0: shuffling and crops (and the subset unless `subset_seed`).
      classification_view: also compute `classification_view` (x_xe).
      shuffle_buffer: int >= 1, shuffle buffer size (in examples).
      skip_corrupt_images: skip and count corrupt images instead of failing.
      drop_remainder: drop the last incomplete batch (static shapes).
      corrupt_image_counter: a `CorruptImageCounter` that records skipped files.
      num_shards: int >= 1, the number of input pipelines (workers) sharing the
        split.
      shard_index: int in [0, num_shards), this pipeline's share: the records
        (files or record ranges, see `sources`) are split before anything is
        decoded, so the shares are disjoint, cover the split (or the per-class
        subset) and differ in size by at most one example. Each pipeline
        shuffles its share with `seed`.
      input_stats: optional `InputStats` that counts the decoded images and
        records this share's size.
      subset_seed: int >= 0 or None (= `seed`): the seed of the per-class subset.
        A run passes its own seed here and a per-epoch one as `seed`, so that a
        resumed run trains on the same examples.

    Returns:
      tf.data.Dataset of (features, labels): features is a dict with `image`
      (float32 [B, S, S, 3] in [0, 1], the deterministic view) and, if
      `classification_view`, `classification_view` (float32 [B, S, S, 3] in
      [0, 1]); labels int32 [B]. Reshuffled every epoch; not repeated.

    Raises:
      ValueError: invalid arguments, unknown or unprepared dataset, a class with
        fewer than `examples_per_class` examples, corrupt files (fail-fast policy).
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("image_size", image_size, 1)
    _check_int("examples_per_class", examples_per_class, 1, allow_none=True)
    _check_int("seed", seed, 0)
    _check_int("shuffle_buffer", shuffle_buffer, 1)
    counter = _counter_for(skip_corrupt_images, corrupt_image_counter)
    source = sources.resolve(dataset, data_dir, image_size)
    split = source.info.train_split if split is None else split
    names = None
    if examples_per_class is not None:
        subset_seed = seed if subset_seed is None else subset_seed
        names, _ = _per_class_subset(source, split, examples_per_class, subset_seed)
    min_short_side = views.min_decoded_side(image_size, classification_view)
    records = source.records(
        split, names=names, skip_corrupt_images=skip_corrupt_images, counter=counter,
        min_short_side=min_short_side, num_shards=num_shards, shard_index=shard_index,
    )
    if drop_remainder and records.num_examples < batch_size:
        share = f"shard {shard_index} of {num_shards} of " if num_shards > 1 else ""
        raise ValueError(
            f"batch_size={batch_size} is larger than the {records.num_examples} examples of "
            f"{share}split {split!r} of {dataset!r}: with drop_remainder=True no batch is "
            "produced"
        )
    if input_stats is not None:
        input_stats.examples_per_epoch = records.num_examples
        input_stats.num_shards, input_stats.shard_index = num_shards, shard_index
    examples = _decoded_examples(
        records, True, seed, shuffle_buffer, skip_corrupt_images, counter, min_short_side,
        input_stats,
    )

    def make_views(example, element_seed):
        image = example["image"]
        features = {"image": views.deterministic_view(image, image_size)}
        if classification_view:
            features["classification_view"] = views.classification_view(
                image, image_size, element_seed
            )
        return features, tf.cast(example["label"], tf.int32)

    dataset_out = _seeded(examples, seed, num_shards, shard_index).map(
        make_views, num_parallel_calls=tf.data.AUTOTUNE
    )
    dataset_out = dataset_out.batch(batch_size, drop_remainder=drop_remainder)
    return dataset_out.prefetch(tf.data.AUTOTUNE)


def _fixed_boxes(boxes, max_boxes):
    """Pads with -1 rows or truncates float32 [N, 4] to [max_boxes, 4]."""
    boxes = boxes[:max_boxes]
    padding = [[0, max_boxes - tf.shape(boxes)[0]], [0, 0]]
    boxes = tf.pad(boxes, padding, constant_values=-1.0)
    boxes.set_shape([max_boxes, 4])
    return boxes


def eval_dataset(dataset, batch_size, image_size, data_dir=None, split=None, with_boxes=False,
                 max_boxes=None, skip_corrupt_images=False, *, corrupt_image_counter=None):
    """The evaluation stream, deterministic view only, in stored order.

    Args:
      dataset: "cluttered_digits", a prepared tfds name, or "folder:/root".
      batch_size: int B >= 1 (the last batch may be smaller).
      image_size: int S >= 1.
      data_dir: tfds data directory (None: the tfds default).
      split: split name; None: the dataset's evaluation split.
      with_boxes: also yield the bounding boxes (datasets with boxes only).
      max_boxes: int N >= 1 or None. With boxes: pad (-1) or truncate to N boxes
        per image; None pads to the largest count in each batch (1 for datasets
        with one box per image).
      skip_corrupt_images: skip and count corrupt images instead of failing.
      corrupt_image_counter: a `CorruptImageCounter` that records skipped files.

    Returns:
      tf.data.Dataset of ({"image": float32 [B, S, S, 3]}, labels int32 [B]); with
      boxes, dicts {"image": float32 [B, S, S, 3], "label": int32 [B],
      "bbox": float32 [B, N, 4]}, boxes in the view's normalised [ymin, xmin,
      ymax, xmax] (resized and centre-cropped like the image, clipped to [0, 1]),
      padding rows -1.

    Raises:
      ValueError: invalid arguments, unknown or unprepared dataset, no evaluation
        split, boxes requested from a dataset without boxes, corrupt files.
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("image_size", image_size, 1)
    _check_int("max_boxes", max_boxes, 1, allow_none=True)
    counter = _counter_for(skip_corrupt_images, corrupt_image_counter)
    source = sources.resolve(dataset, data_dir, image_size)
    info = source.info
    if split is None:
        split = info.eval_split
        if split is None:
            raise ValueError(
                f"dataset {dataset!r} has no validation or test split (splits: "
                f"{sorted(info.splits)}); pass split=..., e.g. 'train[90%:]' for tfds"
            )
    if with_boxes and not info.has_bounding_boxes:
        raise ValueError(
            f"with_boxes=True but dataset {dataset!r} has no bounding boxes; datasets with "
            "boxes have a tfds BBoxFeature (e.g. cluttered_digits, caltech_birds2011)"
        )
    min_short_side = views.min_decoded_side(image_size, False)
    records = source.records(
        split, with_boxes=with_boxes, skip_corrupt_images=skip_corrupt_images,
        counter=counter, min_short_side=min_short_side,
    )
    examples = _decoded_examples(
        records, False, 0, 1, skip_corrupt_images, counter, min_short_side
    )

    def make_view(example):
        image = example["image"]
        view = views.deterministic_view(image, image_size)
        label = tf.cast(example["label"], tf.int32)
        if not with_boxes:
            return {"image": view}, label
        boxes = views.deterministic_view_boxes(example["bbox"], tf.shape(image), image_size)
        if max_boxes is not None:
            boxes = _fixed_boxes(boxes, max_boxes)
        return {"image": view, "label": label, "bbox": boxes}

    dataset_out = examples.map(make_view, num_parallel_calls=tf.data.AUTOTUNE)
    if with_boxes and max_boxes is None:
        dataset_out = dataset_out.padded_batch(
            batch_size,
            padding_values={
                "image": tf.constant(0.0),
                "label": tf.constant(0, tf.int32),
                "bbox": tf.constant(-1.0),
            },
        )
    else:
        dataset_out = dataset_out.batch(batch_size)
    return dataset_out.prefetch(tf.data.AUTOTUNE)


def unlabeled_dataset(source, batch_size, image_size, data_dir=None, split=None, seed=0, *,
                      shuffle_buffer=10000, skip_corrupt_images=False,
                      corrupt_image_counter=None, num_shards=1, shard_index=0, input_stats=None):
    """Images without labels, for the semi-supervised CGC term.

    Args:
      source: "cluttered_digits", a prepared tfds name, or "folder:/root". For a
        folder the images under root/<split> are used recursively, class folders
        or not; split None means root/train if it exists, else root itself.
      batch_size: int B >= 1 (incomplete last batches are dropped).
      image_size: int S >= 1.
      data_dir: tfds data directory (None: the tfds default).
      split: split name; None: the train split (see `source` for folders).
      seed: int >= 0, shuffling seed.
      shuffle_buffer: int >= 1.
      skip_corrupt_images: skip and count corrupt images instead of failing.
      corrupt_image_counter: a `CorruptImageCounter` that records skipped files.
      num_shards, shard_index: this pipeline's share of the images, split
        before decoding (see `train_dataset`).
      input_stats: optional `InputStats` that counts the decoded images.

    Returns:
      tf.data.Dataset of {"image": float32 [B, S, S, 3] in [0, 1]} (the
      deterministic view), reshuffled every epoch, not repeated.
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("image_size", image_size, 1)
    _check_int("seed", seed, 0)
    _check_int("shuffle_buffer", shuffle_buffer, 1)
    counter = _counter_for(skip_corrupt_images, corrupt_image_counter)
    resolved = sources.resolve(source, data_dir, image_size)
    if split is None:
        if isinstance(resolved, sources.FolderSource):
            split = "train" if os.path.isdir(os.path.join(resolved.root, "train")) else None
        else:
            split = resolved.info.train_split
    min_short_side = views.min_decoded_side(image_size, False)
    records = resolved.records(
        split, labeled=False, skip_corrupt_images=skip_corrupt_images, counter=counter,
        min_short_side=min_short_side, num_shards=num_shards, shard_index=shard_index,
    )
    if records.num_examples < batch_size:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {records.num_examples} unlabelled "
            f"images of split {split!r} of {source!r}: no complete batch is produced"
        )
    examples = _decoded_examples(
        records, True, seed, shuffle_buffer, skip_corrupt_images, counter, min_short_side,
        input_stats,
    )
    dataset_out = examples.map(
        lambda example: {"image": views.deterministic_view(example["image"], image_size)},
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    dataset_out = dataset_out.batch(batch_size, drop_remainder=True)
    return dataset_out.prefetch(tf.data.AUTOTUNE)


def semi_supervised_dataset(labeled, unlabeled):
    """Pairs labelled batches with unlabelled ones.

    Args:
      labeled: dataset of (x_l, y_l), e.g. from `train_dataset`.
      unlabeled: dataset of x_u, e.g. from `unlabeled_dataset`.

    Returns:
      tf.data.Dataset of ((x_l, y_l), x_u). The unlabelled stream repeats, so an
      epoch is one pass over the labelled data.
    """
    return tf.data.Dataset.zip((labeled, unlabeled.repeat()))
