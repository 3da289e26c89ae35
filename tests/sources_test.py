"""Tests of cgc_tf/data/sources.py (with records.py and folder_source.py): shard checks,
dataset names, image folders."""

import os

import numpy as np
import tensorflow as tf
from PIL import Image

from cgc_tf.data import folder_source
from cgc_tf.data import sources


def _write_image(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((6, 8, 3), value, np.uint8)).save(path)


class CheckShardTest(tf.test.TestCase):
    def test_valid_shards_pass(self):
        for num_shards, shard_index in ((1, 0), (4, 3), (np.int64(2), np.int32(1))):
            sources.check_shard(num_shards, shard_index)

    def test_invalid_shards_name_the_argument(self):
        cases = (
            ((0, 0), r"num_shards=0 must be an integer >= 1"),
            ((2, -1), r"shard_index=-1 must be an integer >= 0"),
            ((2, 2), r"shard_index=2 must be < num_shards=2"),
            ((True, 0), r"num_shards=True must be an integer"),
            ((2, 0.5), r"shard_index=0.5 must be an integer"),
        )
        for arguments, pattern in cases:
            with self.assertRaisesRegex(ValueError, pattern):
                sources.check_shard(*arguments)


class ResolveTest(tf.test.TestCase):
    def test_bad_names(self):
        for name in ("", None, 3):
            with self.assertRaisesRegex(ValueError, r"dataset=.* must be 'cluttered_digits'"):
                sources.resolve(name)


class FolderTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.root = os.path.join(self.get_temp_dir(), "folder")
        # Classes sorted by name give the label ids; non-images and hidden files are ignored.
        for split, counts in (("train", {"dog": 3, "cat": 2}), ("val", {"dog": 1, "cat": 1})):
            for class_name, count in counts.items():
                for index in range(count):
                    _write_image(
                        os.path.join(self.root, split, class_name, f"{index}.png"), 40 * index
                    )
        with open(os.path.join(self.root, "train", "cat", "notes.txt"), "w") as f:
            f.write("not an image")
        _write_image(os.path.join(self.root, "train", "dog", ".hidden.png"), 0)

    def test_info_from_the_layout(self):
        info = sources.dataset_info("folder:" + self.root)
        self.assertEqual(info.class_names, ("cat", "dog"))
        self.assertEqual(info.num_classes, 2)
        self.assertEqual(info.splits, {"train": 5, "val": 2})
        self.assertEqual(info.train_split, "train")
        self.assertEqual(info.eval_split, "val")
        self.assertFalse(info.has_bounding_boxes)

    def test_list_images_skips_non_images_and_symlink_cycles(self):
        # train/loop -> the root: its val/ is listed, its train/ (already walked) is not.
        link = os.path.join(self.root, "train", "loop")
        os.symlink(self.root, link)
        self.addCleanup(os.unlink, link)
        files, ignored = folder_source.list_images(os.path.join(self.root, "train"))
        self.assertEqual(
            [os.path.relpath(path, self.root) for path in files],
            ["train/cat/0.png", "train/cat/1.png", "train/dog/0.png", "train/dog/1.png",
             "train/dog/2.png", "train/loop/val/cat/0.png", "train/loop/val/dog/0.png"],
        )
        self.assertEqual(ignored, {".txt": 1, ".png": 1})  # notes.txt and .hidden.png

if __name__ == "__main__":
    tf.test.main()
