"""Tests of cgc_tf/data/folder_source.py: an image folder's classes, splits and files."""

import os

import numpy as np
import tensorflow as tf
from PIL import Image

from cgc_tf.data import folder_source
from cgc_tf.data import sources


def _write_image(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((6, 8, 3), value, np.uint8)).save(path)


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

    def test_label_index_and_records_of_one_shard(self):
        source = folder_source.FolderSource("folder:" + self.root)
        paths, labels = source.label_index("train")
        self.assertEqual(
            [os.path.relpath(path, self.root) for path in paths],
            ["train/cat/0.png", "train/cat/1.png", "train/dog/0.png", "train/dog/1.png",
             "train/dog/2.png"],
        )
        self.assertAllEqual(labels, [0, 0, 1, 1, 1])
        # Every second file from index 1, each fully decoded by the validation pass.
        records = source.records("train", num_shards=2, shard_index=1)
        self.assertEqual(records.num_examples, 2)
        self.assertEqual(records.validation_decodes, 2)
        self.assertEqual(records.decoded_bytes, 2 * 6 * 8 * 3)
        (record_names, record_labels), = [
            (batch["name"], batch["label"]) for batch in records.read().batch(8)
        ]
        self.assertEqual(
            [os.path.relpath(name.decode(), self.root) for name in record_names.numpy()],
            ["train/cat/1.png", "train/dog/1.png"],
        )
        self.assertAllEqual(record_labels, [0, 1])
        with self.assertRaisesRegex(ValueError, "has no bounding boxes"):
            source.records("val", with_boxes=True)
        with self.assertRaisesRegex(ValueError, "split='test' is not a split"):
            source.records("test")


if __name__ == "__main__":
    tf.test.main()
