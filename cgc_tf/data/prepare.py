"""Image folders to sharded tensorflow-datasets records, prepared once (`cgc-prepare`).

`prepare_folder` writes a `folder:/root` layout as a tfds dataset in `data_dir`
(encoded bytes unchanged, label, relative path), deterministic and
interruption-safe; training then reads it by name like any prepared tfds
dataset, each worker only its record ranges. Guarantees: docs/data.md
(preparing an image folder as records).
"""

import dataclasses
import inspect
import math
import os
import re
import types

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from cgc_tf import config
from cgc_tf.data import decode
from cgc_tf.data import sources

DEFAULT_SHARD_MIB = 128
VERSION = "1.0.0"
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


class _FolderRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the per-name builders made by `_builder_class` (never registered)."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Encoded image files of an image folder, unchanged."}
    # Set on the subclass: {split: (paths, labels)}, class names, root, skipped files.
    _plan = None
    _class_names = ()
    _root = ""
    _skipped = {}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """epath.Path of this module (tfds looks for checksums.tsv next to it)."""
        # As in cgc_tf.data.cluttered_digits: tfds 4.9.10's default needs the
        # optional importlib_resources backport for builders defined in a package.
        return epath.Path(inspect.getfile(_FolderRecords))

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"The image folder {self._root}, one record per image file.",
            features=tfds.features.FeaturesDict(
                {
                    # Bytes are stored as read; cgc_tf.data.decode decodes any channel count.
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=list(self._class_names)),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(
                source_root=self._root,
                skipped={split: list(paths) for split, paths in self._skipped.items()},
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        return {split: self._generate_examples(split) for split in self._plan}

    def _generate_examples(self, split):
        paths, labels = self._plan[split]
        directory = os.path.join(self._root, split)
        for path, label in zip(paths, labels):
            relative = os.path.relpath(path, directory)
            try:
                with open(path, "rb") as file:
                    encoded = file.read()
            except OSError as error:
                raise ValueError(f"could not read image file {path!r}: {error}") from None
            yield relative, {"image": encoded, "label": int(label), "file_name": relative}


@dataclasses.dataclass(frozen=True)
class _ShardConfig(tfds.core.utils.shard_utils.ShardConfig):
    """ceil(split bytes / `max_shard_size`) files per split (or `num_shards`).

    tfds gives the files equal example counts, so each is about that size.

    tfds's own rule ignores the configured sizes (it reads the class defaults, a
    64 MiB minimum and a 1 GiB maximum) and rounds to powers of two.
    """

    def get_number_shards(self, total_size, num_examples, uses_precise_sharding=True):
        del uses_precise_sharding  # tfds's writer places examples exactly.
        if self.num_shards:
            wanted = self.num_shards
        else:
            wanted = math.ceil((total_size + num_examples * self.overhead) / self.max_shard_size)
        # tfds needs at least one example per file.
        return max(1, min(wanted, num_examples))


@dataclasses.dataclass
class _DownloadConfig(tfds.download.DownloadConfig):
    def get_shard_config(self):
        return _ShardConfig(num_shards=self.num_shards, max_shard_size=self.max_shard_size)


def _builder_class(name, root, class_names, plan, skipped):
    """A builder class named `name` (tfds derives the dataset folder from it)."""
    namespace = {
        "name": name,
        "__module__": __name__,
        "_plan": plan,
        "_class_names": tuple(class_names),
        "_root": root,
        "_skipped": skipped,
    }
    return types.new_class(
        "FolderRecords", (_FolderRecords,), {"skip_registration": True},
        lambda ns: ns.update(namespace),
    )


def check_name(name):
    """Raises ValueError unless `name` can name a prepared folder dataset (str)."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(
            f"name={name!r} must be lower-case letters, digits and underscores, starting "
            "with a letter (a tensorflow-datasets name)"
        )
    reserved = set(config.EMBEDDED_DATASETS) | set(config.ELPV_DATASETS)
    if name in reserved or name in tfds.list_builders(with_community_datasets=False):
        raise ValueError(
            f"name={name!r} is already a dataset name (cgc_tf's or a tensorflow-datasets "
            "builder's); reading it back would find that dataset: choose another"
        )


def _validated_split(source, split, skip_corrupt_images):
    """(paths, labels, skipped paths) of a folder split after the validation pass."""
    paths, labels = source.label_index(split)
    paths = list(paths)
    total_bytes = decode.total_file_bytes(paths)
    full_decode = total_bytes <= decode.FULL_VALIDATION_MAX_BYTES
    logging.info(
        "Checking %d files (%.1f MiB) of split %r (%s)", len(paths), total_bytes / 2**20, split,
        "full decode" if full_decode else "headers",
    )
    problems, _ = decode.validate_files(paths, full_decode)
    if problems and not skip_corrupt_images:
        raise ValueError(
            f"{len(problems)} corrupt image file(s) in split {split!r} of {source.root!r}:\n"
            f"{decode.describe_problems(problems)}\nFix or remove them, or pass "
            "skip_corrupt_images=True (--skip_corrupt_images) to leave them out."
        )
    if problems:
        logging.warning(
            "Leaving out %d corrupt image file(s) of split %r:\n%s",
            len(problems), split, decode.describe_problems(problems),
        )
    kept = [i for i, path in enumerate(paths) if path not in problems]
    return [paths[i] for i in kept], labels[kept], sorted(problems)


def prepare_folder(root, name, data_dir, shard_mib=DEFAULT_SHARD_MIB, num_shards=None,
                   skip_corrupt_images=False, overwrite=False):
    """Writes the image folder `root` as the tfds dataset `name` in `data_dir`.

    Args:
      root: str, a folder with root/train/<class>/* and optionally
        root/val|validation|test/<class>/* (as `folder:` datasets).
      name: str, the dataset name to train with (`--dataset=name`): lower-case
        letters, digits and underscores, not an existing dataset name.
      data_dir: str, the tfds data directory to write into (`--data_dir`).
      shard_mib: float > 0: each split is written as ceil(split size / shard_mib)
        files of equal example counts (so about `shard_mib` MiB or less each).
      num_shards: int >= 1 or None: this many files per split instead (at most
        one per example).
      skip_corrupt_images: bool; False raises on the first corrupt file list.
      overwrite: bool; replace a complete dataset `name` in `data_dir`.

    Returns:
      The prepared builder (`builder.info`: class names, per-split counts,
      `builder.data_dir`: where the record files are).

    Raises:
      ValueError: bad arguments, layout or corrupt files (docs/data.md).
    """
    check_name(name)
    if not isinstance(shard_mib, (int, float)) or isinstance(shard_mib, bool) or shard_mib <= 0:
        raise ValueError(f"shard_mib={shard_mib!r} must be a number > 0")
    if num_shards is not None and (
        isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1
    ):
        raise ValueError(f"num_shards={num_shards!r} must be None or an integer >= 1")
    if not data_dir:
        raise ValueError(f"data_dir={data_dir!r} must be a directory path")
    source = sources.FolderSource(config.FOLDER_PREFIX + root)
    info = source.info
    plan, skipped = {}, {}
    for split in info.splits:
        paths, labels, problems = _validated_split(source, split, skip_corrupt_images)
        plan[split] = (paths, labels)
        if problems:
            directory = os.path.join(source.root, split)
            skipped[split] = [os.path.relpath(path, directory) for path in problems]
    builder_class = _builder_class(name, os.path.abspath(source.root), info.class_names, plan,
                                   skipped)
    builder = builder_class(data_dir=data_dir)
    download_config = _DownloadConfig(
        num_shards=num_shards,
        max_shard_size=int(shard_mib * 2**20),
        download_mode=(
            tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
        ),
    )
    if builder.is_prepared() and not overwrite:
        logging.info("%s is already prepared in %s (overwrite=True redoes it)", name,
                     builder.data_dir)
        return builder
    logging.info("Writing %s (%s) into %s", name, ", ".join(
        f"{split}: {len(paths)}" for split, (paths, _) in plan.items()), data_dir)
    builder.download_and_prepare(download_config=download_config)
    return builder


def format_summary(builder):
    """Lines describing a prepared dataset: where, classes, per-split counts and files.

    Args:
      builder: a prepared tfds builder (what `prepare_folder` returns).

    Returns:
      str, one line per item.
    """
    info = builder.info
    names = info.features["label"].names
    lines = [f"{info.name} in {builder.data_dir}", f"{len(names)} classes: {', '.join(names)}"]
    skipped = dict(info.metadata.get("skipped", {})) if info.metadata else {}
    for split, split_info in sorted(info.splits.items()):
        line = (
            f"{split}: {split_info.num_examples} images in {split_info.num_shards} record "
            f"file(s), {split_info.num_bytes / 2**20:.1f} MiB"
        )
        if skipped.get(split):
            line += f" ({len(skipped[split])} corrupt file(s) left out, see metadata.json)"
        lines.append(line)
    return "\n".join(lines)
