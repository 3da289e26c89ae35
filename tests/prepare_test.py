"""Tests of cgc_tf/data/prepare.py and the cgc-prepare binary on small generated folders."""

import collections
import glob
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import parameterized
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cgc_tf import data
from cgc_tf.data import prepare
from cgc_tf.data import sources
from tests import testing_processes
from tests.testing_base import temporary_directory as _temporary_directory

NAME = "prepare_test_images"
# 12 train images (3 classes x 4) and 3 val images; one train file is a grayscale PNG.
_TRAIN_PER_CLASS = 4
_CLASSES = ("cat", "dog", "emu")


def _write_folder(root, seed=0):
    """Writes root/{train,val}/<class>/*: JPEGs of distinct random content, one PNG."""
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", _TRAIN_PER_CLASS), ("val", 1)):
        for name in _CLASSES:
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for index in range(per_class):
                height, width = rng.integers(10, 24, size=2)
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                if split == "train" and name == "dog" and index == 0:
                    Image.fromarray(pixels[..., 0]).save(os.path.join(folder, "gray.png"))
                else:
                    Image.fromarray(pixels).save(
                        os.path.join(folder, f"{index:02d}.jpg"), quality=90
                    )


def _record_files(data_dir):
    return sorted(glob.glob(os.path.join(data_dir, NAME, "*", "*.tfrecord*")))


def _images_and_labels(dataset, **kwargs):
    """Sorted (label, decoded image bytes) of every example of an evaluation stream."""
    pairs = []
    for images, labels in data.eval_dataset(dataset, 4, 16, **kwargs):
        for image, label in zip(images["image"].numpy(), labels.numpy()):
            pairs.append((int(label), image.tobytes()))
    return sorted(pairs)


class PrepareFolderTest(tf.test.TestCase, parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.directory = tempfile.mkdtemp(prefix="cgc_prepare_test_")
        cls.root = os.path.join(cls.directory, "root")
        _write_folder(cls.root)
        cls.data_dir = os.path.join(cls.directory, "tfds")
        cls.builder = prepare.prepare_folder(cls.root, NAME, cls.data_dir, num_shards=3)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.directory, ignore_errors=True)
        super().tearDownClass()

    def test_records_hold_the_files_unchanged_with_classes_and_counts(self):
        info = sources.dataset_info(NAME, data_dir=self.data_dir)
        folder_info = sources.dataset_info(f"folder:{self.root}")
        self.assertEqual(info.class_names, _CLASSES)
        self.assertEqual(info.class_names, folder_info.class_names)
        self.assertEqual(info.splits, {"train": 12, "val": 3})
        self.assertEqual(info.splits, folder_info.splits)
        self.assertLen(_record_files(self.data_dir), 6)  # 3 files per split
        stored = self.builder.as_dataset(
            split="train", decoders={"image": tfds.decode.SkipDecoding()}
        )
        seen = set()
        for example in stored.as_numpy_iterator():
            relative = example["file_name"].decode()
            with open(os.path.join(self.root, "train", relative), "rb") as file:
                self.assertEqual(example["image"], file.read())  # never re-encoded
            self.assertEqual(_CLASSES[example["label"]], relative.split(os.sep)[0])
            seen.add(relative)
        self.assertLen(seen, 12)
        self.assertIn(os.path.join("dog", "gray.png"), seen)

    @parameterized.parameters("train", "val")
    def test_pipeline_sees_the_images_and_labels_of_the_folder(self, split):
        self.assertEqual(
            _images_and_labels(NAME, data_dir=self.data_dir, split=split),
            _images_and_labels(f"folder:{self.root}", split=split),
        )

    @parameterized.parameters(2, 3)
    def test_worker_shares_cover_the_epoch_once(self, num_shards):
        source = sources.resolve(NAME, data_dir=self.data_dir)
        everything = [r["name"] for r in source.records("train").read().as_numpy_iterator()]
        shares = []
        for index in range(num_shards):
            records = source.records("train", num_shards=num_shards, shard_index=index)
            shares.append([r["name"] for r in records.read().as_numpy_iterator()])
            self.assertEqual(records.num_examples, len(shares[-1]))
        union = [name for share in shares for name in share]
        self.assertCountEqual(union, everything)  # each example once, no duplicates
        self.assertLessEqual(max(map(len, shares)) - min(map(len, shares)), 1)
        if num_shards == 3:
            # 3 record files of 4 examples: each worker reads exactly one file.
            files = [{name.split(b"__")[0] for name in share} for share in shares]
            self.assertEqual([len(f) for f in files], [1, 1, 1])
            self.assertLen(set.union(*files), 3)
        # The training pipeline's shares, decoded: the folder's images, once.
        images = []
        for index in range(num_shards):
            shard = data.train_dataset(
                NAME, 1, 16, data_dir=self.data_dir, seed=1, drop_remainder=False,
                num_shards=num_shards, shard_index=index, classification_view=False,
            )
            images += [int(labels[0]) for _, labels in shard]
        self.assertEqual(collections.Counter(images), collections.Counter({0: 4, 1: 4, 2: 4}))

    def test_same_folder_gives_identical_record_files(self):
        other = _temporary_directory(self)
        prepare.prepare_folder(self.root, NAME, other, num_shards=3)
        mine, theirs = _record_files(self.data_dir), _record_files(other)
        self.assertEqual([os.path.basename(p) for p in mine], [os.path.basename(p) for p in theirs])
        for a, b in zip(mine, theirs):
            with open(a, "rb") as file_a, open(b, "rb") as file_b:
                self.assertEqual(file_a.read(), file_b.read())

    def test_second_call_reuses_and_overwrite_redoes(self):
        before = os.path.getmtime(_record_files(self.data_dir)[0])
        prepare.prepare_folder(self.root, NAME, self.data_dir, num_shards=3)
        self.assertEqual(os.path.getmtime(_record_files(self.data_dir)[0]), before)
        other = _temporary_directory(self)
        prepare.prepare_folder(self.root, NAME, other, num_shards=2)
        prepare.prepare_folder(self.root, NAME, other, num_shards=3, overwrite=True)
        self.assertLen(_record_files(other), 6)

    def test_shard_size_limit(self):
        other = _temporary_directory(self)
        builder = prepare.prepare_folder(self.root, NAME, other, shard_mib=1 / 1024)
        train = builder.info.splits["train"]
        self.assertGreater(train.num_shards, 1)
        for path in glob.glob(os.path.join(builder.data_dir, "*-train.tfrecord*")):
            # A file holds whole records, so it may pass the limit by its last record.
            self.assertLess(os.path.getsize(path), 1024 + 2048)
        one = prepare.prepare_folder(self.root, NAME, _temporary_directory(self))
        self.assertEqual(one.info.splits["train"].num_shards, 1)
        self.assertIn("train: 12 images in 1 record file(s)", prepare.format_summary(one))


class PrepareFailuresTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.directory = _temporary_directory(self)
        self.root = os.path.join(self.directory, "root")
        _write_folder(self.root)
        self.data_dir = os.path.join(self.directory, "tfds")

    def test_interruption_leaves_no_visible_dataset_and_a_rerun_completes(self):
        original = prepare._FolderRecords._generate_examples

        def interrupted(builder, split):
            for count, example in enumerate(original(builder, split)):
                if split == "val" or count == 5:
                    raise KeyboardInterrupt  # as a Ctrl-C mid-split
                yield example

        prepare._FolderRecords._generate_examples = interrupted
        try:
            with self.assertRaises(KeyboardInterrupt):
                prepare.prepare_folder(self.root, NAME, self.data_dir, num_shards=3)
        finally:
            prepare._FolderRecords._generate_examples = original
        self.assertEqual(_record_files(self.data_dir), [])
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, NAME, prepare.VERSION)))
        with self.assertRaisesRegex(ValueError, f"written by `cgc-prepare --name={NAME}`"):
            sources.resolve(NAME, data_dir=self.data_dir)
        # A killed run leaves its temporary folder behind: invisible and harmless.
        os.makedirs(os.path.join(self.data_dir, NAME, f"incomplete.KILLED_{prepare.VERSION}"))
        prepare.prepare_folder(self.root, NAME, self.data_dir, num_shards=3)
        clean = _temporary_directory(self)
        prepare.prepare_folder(self.root, NAME, clean, num_shards=3)
        for a, b in zip(_record_files(self.data_dir), _record_files(clean), strict=True):
            with open(a, "rb") as file_a, open(b, "rb") as file_b:
                self.assertEqual(file_a.read(), file_b.read())

    def test_corrupt_file_fails_naming_it_or_is_left_out(self):
        bad = os.path.join(self.root, "train", "cat", "broken.jpg")
        with open(bad, "wb") as file:
            file.write(b"\xff\xd8\xff\xe0 truncated")
        with self.assertRaisesRegex(ValueError, r"(?s)1 corrupt image file.*broken\.jpg"):
            prepare.prepare_folder(self.root, NAME, self.data_dir)
        self.assertEqual(_record_files(self.data_dir), [])
        builder = prepare.prepare_folder(self.root, NAME, self.data_dir, skip_corrupt_images=True)
        self.assertEqual(builder.info.splits["train"].num_examples, 12)
        self.assertEqual(
            dict(builder.info.metadata["skipped"]), {"train": [os.path.join("cat", "broken.jpg")]}
        )
        self.assertIn("1 corrupt file(s) left out", prepare.format_summary(builder))

    def test_empty_train_class_folder_is_an_error(self):
        os.makedirs(os.path.join(self.root, "train", "fox"))
        with self.assertRaisesRegex(ValueError, r"class folders without image files.*fox"):
            prepare.prepare_folder(self.root, NAME, self.data_dir)

    def test_bad_arguments(self):
        cases = (
            (dict(name="Bad-Name"), r"name='Bad-Name' must be lower-case"),
            (dict(name="cluttered_digits"), r"name='cluttered_digits' is already a dataset"),
            (dict(name="mnist"), r"name='mnist' is already a dataset"),
            (dict(shard_mib=0), r"shard_mib=0 must be a number > 0"),
            (dict(num_shards=0), r"num_shards=0 must be None or an integer >= 1"),
            (dict(data_dir=""), r"data_dir='' must be a directory path"),
            (dict(root=os.path.join(self.directory, "missing")), r"does not exist"),
        )
        for overrides, pattern in cases:
            arguments = dict(root=self.root, name=NAME, data_dir=self.data_dir)
            arguments.update(overrides)
            with self.assertRaisesRegex(ValueError, pattern):
                prepare.prepare_folder(**arguments)


class PrepareBinaryTest(tf.test.TestCase):
    @pytest.mark.slow  # two processes that import TensorFlow
    def test_binary_prepares_and_fails_in_one_line(self):
        directory = _temporary_directory(self)
        root = os.path.join(directory, "root")
        _write_folder(root)
        data_dir = os.path.join(directory, "tfds")
        command = [sys.executable, "-m", "prepare.main", f"--folder={root}", f"--name={NAME}",
                   f"--data_dir={data_dir}", "--num_shards=2"]
        environment = testing_processes.subprocess_environment()
        completed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                   cwd=testing_processes.REPO, env=environment)
        self.assertEqual(completed.returncode, 0, completed.stderr[-2000:])
        self.assertIn("3 classes: cat, dog, emu", completed.stdout)
        self.assertIn("train: 12 images in 2 record file(s)", completed.stdout)
        self.assertIn(f"cgc-train --dataset={NAME} --data_dir={data_dir}", completed.stdout)
        self.assertLen(_record_files(data_dir), 4)
        with open(os.path.join(root, "val", "cat", "bad.png"), "w") as file:
            file.write("not an image")
        completed = subprocess.run(command + ["--overwrite"], capture_output=True, text=True,
                                   timeout=300, cwd=testing_processes.REPO, env=environment)
        self.assertEqual(completed.returncode, 1)
        self.assertIn("cgc-prepare: 1 corrupt image file(s) in split 'val'", completed.stderr)
        self.assertIn("bad.png", completed.stderr)


if __name__ == "__main__":
    tf.test.main()
