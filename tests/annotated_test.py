"""Tests of cgc_tf/data/annotated.py on hand-computed oracles: Pascal-VOC folders and
tfds datasets with boxes as the paper protocol's examples.

tests/reference_evaluation_parity_test.py checks the VOC folder reader against the
reference's own code (torch); these run without it.
"""

import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf

from cgc_tf import metrics
from cgc_tf.data import annotated
from cgc_tf.data import records
from tests.testing_base import write_voc_image as _write_image

CLASS_NAMES = ["n001", "n002", "n003"]


class AnnotatedFolderTest(tf.test.TestCase):

    def test_boxes_labels_and_masks_follow_torchray(self):
        with tempfile.TemporaryDirectory() as root:
            # The label is the first object's class; two boxes of it, one of n001.
            _write_image(root, "ILSVRC_1", 20, 10, [
                ("n002", 2, 3, 5, 4), ("n001", 1, 1, 20, 10), ("n002", 12, 6, 14, 10),
            ])
            _write_image(root, "ILSVRC_2", 8, 12, [("n003", 1, 1, 8, 12)], seed=1)
            examples = list(annotated.voc_folder_examples(root, CLASS_NAMES))
        self.assertEqual([e["label"] for e in examples], [1, 2])
        self.assertEqual(examples[0]["image"].shape, (10, 20, 3))
        self.assertAllEqual(examples[0]["box_labels"], [1, 0, 1])
        # TorchRay: mask[ymin-1:ymax, xmin-1:xmax] = 1 for each box of the label.
        expected = np.zeros((10, 20), bool)
        expected[2:4, 1:5] = True
        expected[5:10, 11:14] = True
        gt = examples[0]["boxes"][examples[0]["box_labels"] == 1]
        self.assertAllEqual(metrics.boxes_to_mask(gt[None], 10, 20)[0], expected)

    def test_numeric_class_names_map_like_torchray(self):
        names = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
        self.assertEqual(annotated.class_index("002.Laysan_Albatross", names), 1)
        self.assertEqual(annotated.class_index("2", names), 1)
        self.assertIsNone(annotated.class_index("n123", names))

    def test_missing_and_malformed_annotations_are_named(self):
        cases = [
            (False, "has no annotation"),
            ("<annotation><size><width>4</width>", "not valid XML"),
            ("<annotation><object><name>n001</name></object></annotation>", "no <size>"),
            ("<annotation><size><width>4</width><height>4</height></size><object><name>n001"
             "</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax></bndbox></object>"
             "</annotation>", "no <ymax>"),
            ("<annotation><size><width>4</width><height>4</height></size></annotation>",
             "no <object>"),
            ("<annotation><size><width>4</width><height>4</height></size><object><name>dog"
             "</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax>"
             "</bndbox></object></annotation>", "is not one of the 3 classes"),
            ("<annotation><size><width>5</width><height>4</height></size><object><name>n001"
             "</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax>"
             "</bndbox></object></annotation>", "gives <size> 5x4"),
        ]
        for xml, message in cases:
            with self.subTest(message=message), tempfile.TemporaryDirectory() as root:
                _write_image(root, "image", 4, 4, xml=xml)
                with self.assertRaisesRegex(ValueError, message):
                    list(annotated.voc_folder_examples(root, CLASS_NAMES))

    def test_missing_folders_are_explained(self):
        with tempfile.TemporaryDirectory() as root:
            with self.assertRaisesRegex(ValueError, "must contain val/"):
                list(annotated.voc_folder_examples(root, CLASS_NAMES))


class _BoxSource:
    """Stands in for a resolved tfds source with boxes: two PNG records, 1 and 2 boxes."""

    def __init__(self, has_bounding_boxes=True, eval_split="test"):
        self.info = records.DatasetInfo(
            name="boxes", num_classes=3, class_names=("a", "b", "c"),
            splits={"train": 2, "test": 2}, train_split="train", eval_split=eval_split,
            has_bounding_boxes=has_bounding_boxes,
        )
        self.images = [
            np.random.default_rng(index).integers(0, 256, (4 + index, 6, 3), dtype=np.uint8)
            for index in range(2)
        ]
        self.labels = [2, 0]
        self.boxes = [
            np.array([[0.0, 0.5, 0.5, 1.0]], np.float32),
            np.array([[0.2, 0.0, 0.6, 0.5], [0.4, 0.5, 1.0, 1.0]], np.float32),
        ]
        self.requests = []

    def records(self, split, with_boxes=False):
        self.requests.append((split, with_boxes))

        def examples():
            for index, image in enumerate(self.images):
                yield {
                    "name": f"record-{index}",
                    "encoded": tf.io.encode_png(image).numpy(),
                    "label": self.labels[index],
                    "bbox": self.boxes[index],
                }

        signature = {
            "name": tf.TensorSpec([], tf.string),
            "encoded": tf.TensorSpec([], tf.string),
            "label": tf.TensorSpec([], tf.int64),
            "bbox": tf.TensorSpec([None, 4], tf.float32),
        }
        return records.Records(
            lambda: tf.data.Dataset.from_generator(examples, output_signature=signature), 2, None
        )


class TfdsExamplesTest(tf.test.TestCase):

    def test_records_become_native_resolution_examples_labelled_by_their_class(self):
        source = _BoxSource()
        with mock.patch.object(annotated.sources, "resolve", return_value=source) as resolve:
            examples = list(annotated.tfds_examples("boxes", "/data", image_size=24))
            train = list(annotated.tfds_examples("boxes", "/data", split="train"))
        self.assertEqual(
            resolve.call_args_list,
            [mock.call("boxes", "/data", 24), mock.call("boxes", "/data", 32)],
        )
        self.assertEqual(source.requests, [("test", True), ("train", True)])
        self.assertLen(examples, 2)
        self.assertLen(train, 2)
        for index, example in enumerate(examples):
            self.assertEqual(example["name"], f"record-{index}")
            self.assertAllEqual(example["image"], source.images[index])  # PNG: lossless
            self.assertEqual(example["label"], source.labels[index])
            self.assertAllEqual(example["boxes"], source.boxes[index])
            # Every box of a tfds record is of the record's class.
            self.assertAllEqual(example["box_labels"], [source.labels[index]] * (index + 1))
            self.assertEqual(example["box_labels"].dtype, np.int32)

    def test_datasets_without_boxes_or_evaluation_split_are_refused(self):
        cases = (
            (_BoxSource(has_bounding_boxes=False), "has no bounding boxes"),
            (_BoxSource(eval_split=None), "has no evaluation split; pass split"),
        )
        for source, message in cases:
            with mock.patch.object(annotated.sources, "resolve", return_value=source):
                with self.assertRaisesRegex(ValueError, message):
                    list(annotated.tfds_examples("boxes"))


if __name__ == "__main__":
    tf.test.main()
