"""Tests of cgc_tf/data/pipeline.py on a small image folder: views, order, argument checks."""

import os

import numpy as np
import tensorflow as tf
from PIL import Image

from cgc_tf.data import pipeline
from cgc_tf.data import views


class PipelineTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.root = os.path.join(self.get_temp_dir(), "folder")
        rng = np.random.default_rng(0)
        self.val = {}
        for split, count in (("train", 3), ("val", 2)):
            for class_name in ("cat", "dog"):
                for index in range(count):
                    pixels = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
                    path = os.path.join(self.root, split, class_name, f"{index}.png")
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    Image.fromarray(pixels).save(path)
                    if split == "val":
                        self.val[(class_name, index)] = pixels
        self.dataset = "folder:" + self.root

    def test_eval_dataset_is_the_deterministic_view_in_stored_order(self):
        batches = list(pipeline.eval_dataset(self.dataset, 3, 16))
        self.assertEqual([int(labels.shape[0]) for _, labels in batches], [3, 1])
        images = np.concatenate([features["image"] for features, _ in batches])
        labels = np.concatenate([labels for _, labels in batches])
        # Files sorted by path: cat/0, cat/1, dog/0, dog/1; labels by sorted class name.
        order = [("cat", 0), ("cat", 1), ("dog", 0), ("dog", 1)]
        self.assertAllEqual(labels, [0, 0, 1, 1])
        for image, key in zip(images, order):
            self.assertAllClose(image, views.deterministic_view(self.val[key], 16), atol=1e-6)

    def test_semi_supervised_dataset_repeats_the_unlabelled_stream(self):
        labelled = tf.data.Dataset.from_tensor_slices((tf.range(5), tf.range(5) * 10))
        unlabelled = tf.data.Dataset.range(100, 102)
        pairs = [(int(x), int(y), int(u)) for (x, y), u in
                 pipeline.semi_supervised_dataset(labelled, unlabelled)]
        self.assertEqual(
            pairs, [(0, 0, 100), (1, 10, 101), (2, 20, 100), (3, 30, 101), (4, 40, 100)]
        )

    def test_invalid_arguments_name_themselves(self):
        for kwargs, pattern in (
            (dict(batch_size=0, image_size=16), r"batch_size=0"),
            (dict(batch_size=2, image_size=0), r"image_size=0"),
            (dict(batch_size=2, image_size=16, max_boxes=0), r"max_boxes=0"),
        ):
            with self.assertRaisesRegex(ValueError, pattern):
                pipeline.eval_dataset(self.dataset, **kwargs)


if __name__ == "__main__":
    tf.test.main()
