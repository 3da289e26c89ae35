"""An image folder `root/<split>/<class>/*` as a dataset source.

Class ids are the sorted class folder names of `train`; the other splits reuse
them. Hidden entries are ignored, class folders are searched recursively and
symlinks followed; docs/data.md lists the rules for empty and missing class
folders and stray files. We list folders ourselves rather than use
`tfds.folder_dataset.ImageFolder`, which cannot decode grayscale or 16-bit files,
name or skip a corrupt file, or validate a folder first.
"""

import collections
import os

from absl import logging
import numpy as np
import tensorflow as tf

from cgc_tf import config
from cgc_tf.data import decode
from cgc_tf.data.records import DatasetInfo
from cgc_tf.data.records import EVAL_SPLITS
from cgc_tf.data.records import Records
from cgc_tf.data.records import check_shard

FOLDER_SPLITS = ("train", "val", "validation", "test")


def list_images(directory):
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
            layout is invalid (docs/data.md, image folders).
        """
        if self._info is not None:
            return self._info
        class_names = self._classes()
        split_names = [s for s in FOLDER_SPLITS if os.path.isdir(os.path.join(self._root, s))]
        splits = {split: len(self._listing(split)[0]) for split in split_names}
        self._info = DatasetInfo(
            name=self._dataset,
            num_classes=len(class_names),
            class_names=class_names,
            splits=splits,
            train_split="train",
            eval_split=next((s for s in EVAL_SPLITS if s in splits), None),
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
            files, class_ignored = list_images(os.path.join(directory, name))
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
            paths, ignored = list_images(directory)
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
