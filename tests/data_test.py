"""The public tf.data builders of cgc_tf.data on the embedded dataset and image folders.

Prepared tensorflow-datasets builders are tested in tfds_source_test.py.
"""

import io
import os
import shutil
import tempfile
from unittest import mock

from absl.testing import parameterized
import numpy as np
import pytest
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from cgc_tf import data
from cgc_tf.data import cluttered_digits
from cgc_tf.data import sources
from cgc_tf.data import views
from tests.testing_base import temporary_directory as _temporary_directory

IMAGE_SIZE = 32


def _write_image(path, array, image_format):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, image_format)
    with open(path, "wb") as handle:
        handle.write(buffer.getvalue())


class ClutteredDigitsTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.data_dir = tempfile.mkdtemp(prefix="cgc_data_test_")
        cls.info = data.dataset_info("cluttered_digits", cls.data_dir, IMAGE_SIZE)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.data_dir, ignore_errors=True)
        super().tearDownClass()

    def test_info(self):
        self.assertEqual(self.info.num_classes, 10)
        self.assertEqual(self.info.class_names, tuple(str(d) for d in range(10)))
        self.assertEqual(self.info.splits, {"train": 5748, "test": 720})
        self.assertEqual((self.info.train_split, self.info.eval_split), ("train", "test"))
        self.assertTrue(self.info.has_bounding_boxes)

    @pytest.mark.slow
    def test_shards_are_disjoint_record_ranges_that_cover_the_split(self):
        source = sources.resolve("cluttered_digits", self.data_dir, IMAGE_SIZE)
        names, _ = source.label_index("train")
        subset = [str(name) for name in names[::97]]
        for num_shards in (2, 3):
            for selection in (None, subset):
                shares = [
                    source.records("train", names=selection, num_shards=num_shards,
                                   shard_index=index)
                    for index in range(num_shards)
                ]
                read = [
                    [record["name"].decode() for record in share.read().as_numpy_iterator()]
                    for share in shares
                ]
                everything = sum(read, [])
                wanted = list(names) if selection is None else selection
                self.assertCountEqual(everything, wanted)
                self.assertLen(set(everything), len(everything))
                self.assertEqual([share.num_examples for share in shares], [len(r) for r in read])
                sizes = [len(r) for r in read]
                self.assertLessEqual(max(sizes) - min(sizes), 1)

    def test_sharded_pipeline_decodes_its_share_once(self):
        stats = data.InputStats()
        shard = data.train_dataset(
            "cluttered_digits", 64, IMAGE_SIZE, data_dir=self.data_dir, num_shards=3,
            shard_index=1, input_stats=stats, classification_view=False,
        )
        for _ in range(2):
            batches = sum(1 for _ in shard)
        self.assertEqual(stats.examples_per_epoch, 5748 // 3)
        self.assertEqual(batches, (5748 // 3) // 64)
        self.assertEqual(stats.images_decoded, 5748 // 3)  # cached after the first pass

    def test_train_batches(self):
        dataset = data.train_dataset("cluttered_digits", 8, IMAGE_SIZE, data_dir=self.data_dir)
        self.assertEqual(int(dataset.cardinality()), 5748 // 8)
        features, labels = next(iter(dataset))
        self.assertEqual(set(features), {"image", "classification_view"})
        for key in ("image", "classification_view"):
            self.assertEqual(features[key].dtype, tf.float32)
            self.assertEqual(features[key].shape, (8, IMAGE_SIZE, IMAGE_SIZE, 3))
            self.assertBetween(float(tf.reduce_min(features[key])), 0.0, 1.0)
            self.assertBetween(float(tf.reduce_max(features[key])), 0.5, 1.0)
        self.assertEqual(labels.dtype, tf.int32)
        self.assertEqual(labels.shape, (8,))
        self.assertAllInRange(labels, 0, 9)
        self.assertGreater(
            float(tf.reduce_mean(tf.abs(features["image"] - features["classification_view"]))), 0.02
        )

    def test_classification_view_can_be_omitted(self):
        dataset = data.train_dataset(
            "cluttered_digits", 4, IMAGE_SIZE, data_dir=self.data_dir, classification_view=False
        )
        self.assertEqual(set(dataset.element_spec[0]), {"image"})

    def test_eval_order_is_deterministic_and_stored(self):
        dataset = data.eval_dataset("cluttered_digits", 16, IMAGE_SIZE, data_dir=self.data_dir)
        first = [(x["image"].numpy(), y.numpy()) for x, y in dataset.take(2)]
        second = [(x["image"].numpy(), y.numpy()) for x, y in dataset.take(2)]
        for (image_a, label_a), (image_b, label_b) in zip(first, second):
            self.assertAllEqual(image_a, image_b)
            self.assertAllEqual(label_a, label_b)
        raw = cluttered_digits.load("test", data_dir=self.data_dir, image_size=IMAGE_SIZE)
        raw_labels = [int(example["label"]) for example in raw.take(32)]
        self.assertAllEqual(np.concatenate([label for _, label in first]), raw_labels)

    def test_boxes_follow_the_deterministic_view_and_contain_the_digit(self):
        dataset = data.eval_dataset(
            "cluttered_digits", 8, IMAGE_SIZE, data_dir=self.data_dir, with_boxes=True
        )
        batch = next(iter(dataset))
        self.assertEqual(batch["bbox"].shape, (8, 1, 4))
        self.assertEqual(batch["label"].dtype, tf.int32)
        boxes = batch["bbox"].numpy()[:, 0]
        self.assertAllInRange(boxes, 0.0, 1.0)
        self.assertTrue(np.all(boxes[:, 0] < boxes[:, 2]) and np.all(boxes[:, 1] < boxes[:, 3]))
        # Oracle: resize 32 -> 37 (round(32 * 256 / 224)), centre crop offset 2.
        side, offset = views.resize_side(IMAGE_SIZE), (views.resize_side(IMAGE_SIZE) - 32) // 2
        raw = list(cluttered_digits.load("test", self.data_dir, IMAGE_SIZE).take(8))
        for box, example in zip(boxes, raw):
            expected = np.clip((example["bbox"].numpy() * side - offset) / IMAGE_SIZE, 0, 1)
            self.assertAllClose(box, expected, atol=1e-6)
            # The digit's ink, put through the same view, lies inside the box.
            for placement in range(cluttered_digits.PLACEMENTS_PER_DIGIT["test"]):
                rendered, ink = cluttered_digits.generate_example(
                    "test", int(example["source_index"]), placement, IMAGE_SIZE
                )
                if np.array_equal(rendered["image"], example["image"].numpy()):
                    break
            ink_view = views.deterministic_view(np.repeat(ink[..., None] * 255, 3, -1), 32)
            rows, columns = np.nonzero(ink_view.numpy()[..., 0] > 0.5)
            tolerance = 1.0 / IMAGE_SIZE
            self.assertGreater(len(rows), 0)
            self.assertGreaterEqual((rows + 0.5).min() / 32, box[0] - tolerance)
            self.assertLessEqual((rows + 0.5).max() / 32, box[2] + tolerance)
            self.assertGreaterEqual((columns + 0.5).min() / 32, box[1] - tolerance)
            self.assertLessEqual((columns + 0.5).max() / 32, box[3] + tolerance)

    def test_max_boxes_pads_with_minus_one(self):
        dataset = data.eval_dataset(
            "cluttered_digits", 4, IMAGE_SIZE, data_dir=self.data_dir, with_boxes=True,
            max_boxes=3,
        )
        boxes = next(iter(dataset))["bbox"]
        self.assertEqual(boxes.shape, (4, 3, 4))
        self.assertAllEqual(boxes[:, 1:], -tf.ones([4, 2, 4]))

    def test_per_class_subset_is_seeded_and_reshuffled_each_epoch(self):
        def build(seed):
            return data.train_dataset(
                "cluttered_digits", 20, IMAGE_SIZE, data_dir=self.data_dir, split="test",
                examples_per_class=2, seed=seed,
            )

        def epoch(dataset):
            (features, labels), = list(dataset)
            return features["image"].numpy(), features["classification_view"].numpy(), labels

        dataset = build(seed=3)
        images_1, crops_1, labels_1 = epoch(dataset)
        images_2, crops_2, labels_2 = epoch(dataset)
        self.assertAllEqual(np.bincount(labels_1, minlength=10), [2] * 10)
        self.assertNotAllEqual(labels_1, labels_2)  # Reshuffled...
        self.assertAllEqual(np.sort(images_1.sum((1, 2, 3))), np.sort(images_2.sum((1, 2, 3))))
        self.assertNotAllClose(np.sort(crops_1.sum((1, 2, 3))), np.sort(crops_2.sum((1, 2, 3))))
        again_images, _, again_labels = epoch(build(seed=3))
        self.assertAllEqual(again_labels, labels_1)  # ...deterministically.
        self.assertAllEqual(again_images, images_1)
        other_images, _, _ = epoch(build(seed=4))
        self.assertNotAllClose(
            np.sort(other_images.sum((1, 2, 3))), np.sort(images_1.sum((1, 2, 3)))
        )


@pytest.mark.slow
class ClutteredDigitsHoldoutTest(tf.test.TestCase):
    """`cluttered_digits_holdout`: the train digits split into train and validation."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.data_dir = tempfile.mkdtemp(prefix="cgc_holdout_test_")
        cls.info = data.dataset_info("cluttered_digits_holdout", cls.data_dir, IMAGE_SIZE)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.data_dir, ignore_errors=True)
        super().tearDownClass()

    def _by_digit(self, split, holdout):
        """{source_index: sorted image bytes of its placements} of one split."""
        found = {}
        raw = cluttered_digits.load(split, self.data_dir, IMAGE_SIZE, holdout=holdout)
        for example in tfds.as_numpy(raw):
            found.setdefault(int(example["source_index"]), []).append(example["image"].tobytes())
        return {digit: sorted(images) for digit, images in found.items()}

    def test_splits_and_evaluation_on_validation(self):
        self.assertEqual(self.info.splits, {"train": 4924, "validation": 824, "test": 720})
        self.assertEqual((self.info.train_split, self.info.eval_split), ("train", "validation"))
        evaluation = data.eval_dataset(
            "cluttered_digits_holdout", 100, IMAGE_SIZE, data_dir=self.data_dir
        )
        self.assertEqual(sum(int(y.shape[0]) for _, y in evaluation), 824)

    def test_train_and_validation_partition_the_train_digits_unchanged(self):
        train = self._by_digit("train", holdout=True)
        validation = self._by_digit("validation", holdout=True)
        original = self._by_digit("train", holdout=False)
        self.assertEmpty(set(train) & set(validation))
        self.assertEqual(set(validation), set(cluttered_digits.holdout_source_indices().tolist()))
        self.assertEqual(set(train) | set(validation), set(original))
        # Byte-identical to the ordinary config's examples of the same digits.
        for digit, images in {**train, **validation}.items():
            self.assertEqual(images, original[digit], f"source digit {digit}")
        # Every class is held out, and the test split is the ordinary one.
        _, labels = cluttered_digits.load_source_digits()
        self.assertLen(set(labels[sorted(validation)].tolist()), 10)
        self.assertEqual(self._by_digit("test", holdout=True), self._by_digit("test", False))

    def test_a_concurrent_prepare_that_lost_the_rename_reads_the_winner_copy(self):
        # tfds renames a complete copy into place; the process that renames second
        # gets FileExistsError (seen with two runs started together).
        lost_rename = mock.patch.object(
            cluttered_digits.ClutteredDigits, "download_and_prepare",
            side_effect=FileExistsError("Cannot rename: destination already exists"),
        )
        with lost_rename:
            builder = cluttered_digits.builder(self.data_dir, IMAGE_SIZE, holdout=True)
            self.assertEqual(builder.info.splits["validation"].num_examples, 824)
            with self.assertRaises(FileExistsError):  # nothing prepared there: not hidden
                cluttered_digits.builder(_temporary_directory(self), IMAGE_SIZE, holdout=True)

    def test_per_class_subset_comes_from_the_holdout_train_split(self):
        dataset = data.train_dataset(
            "cluttered_digits_holdout", 30, IMAGE_SIZE, data_dir=self.data_dir,
            examples_per_class=3, classification_view=False,
        )
        labels = np.concatenate([y.numpy() for _, y in dataset])
        self.assertAllEqual(np.bincount(labels, minlength=10), [3] * 10)


class FolderTest(tf.test.TestCase, parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.root = _temporary_directory(self)
        self.value = {}
        # Every image is one flat grey value, so views identify their source image.
        for split, classes, count in (("train", "abc", 4), ("val", "ac", 2)):
            for class_index, name in enumerate(classes):
                for i in range(count):
                    value = 10 + 40 * "abc".index(name) + 8 * i + (4 if split == "val" else 0)
                    image_format = "PNG" if i % 2 else "JPEG"
                    extension = "png" if i % 2 else "jpg"
                    path = os.path.join(self.root, split, name, f"{i}.{extension}")
                    _write_image(path, np.full((20, 20, 3), value, np.uint8), image_format)
                    self.value[path] = value
        self.dataset = f"folder:{self.root}"

    def _values(self, images):
        return sorted(np.round(images.numpy().mean((1, 2, 3)) * 255).astype(int).tolist())

    def test_info_and_eval_uses_train_class_ids(self):
        info = data.dataset_info(self.dataset)
        self.assertEqual(info.class_names, ("a", "b", "c"))
        self.assertEqual(info.splits, {"train": 12, "val": 4})
        self.assertEqual((info.train_split, info.eval_split), ("train", "val"))
        (features, labels), = list(data.eval_dataset(self.dataset, 8, 16))
        self.assertAllEqual(labels, [0, 0, 2, 2])
        self.assertEqual(self._values(features["image"]), [14, 22, 94, 102])

    def test_train_epoch(self):
        batches = list(data.train_dataset(self.dataset, 4, 16, seed=1))
        self.assertLen(batches, 3)
        labels = np.concatenate([labels for _, labels in batches])
        self.assertAllEqual(np.sort(labels), [0] * 4 + [1] * 4 + [2] * 4)
        images = tf.concat([features["image"] for features, _ in batches], 0)
        expected = sorted(value for path, value in self.value.items() if "train" in path)
        self.assertEqual(self._values(images), expected)

    def test_examples_per_class(self):
        def subset(seed):
            (features, labels), = list(
                data.train_dataset(self.dataset, 6, 16, examples_per_class=2, seed=seed)
            )
            self.assertAllEqual(np.bincount(labels.numpy()), [2, 2, 2])
            return self._values(features["image"])

        self.assertEqual(subset(0), subset(0))
        self.assertNotEqual(subset(0), subset(1))

    def test_subset_seed_fixes_the_subset_and_labelled_subset_names_it(self):
        def trained_on(seed, subset_seed):
            (features, _), = list(data.train_dataset(
                self.dataset, 6, 16, examples_per_class=2, seed=seed, subset_seed=subset_seed
            ))
            return self._values(features["image"])

        subset = data.labelled_subset(self.dataset, 2, 3, 16)
        self.assertEqual(subset["split"], "train")
        self.assertEqual(list(subset["examples"]), ["a", "b", "c"])
        for class_name, names in subset["examples"].items():
            self.assertLen(names, 2)
            for name in names:  # Relative to the root: the same wherever it is mounted.
                self.assertEqual(os.path.dirname(name), os.path.join("train", class_name))
        expected = sorted(
            self.value[os.path.join(self.root, name)]
            for names in subset["examples"].values()
            for name in names
        )
        # The per-epoch seeds of a run move the shuffling, not the subset.
        for seed in (3, 4, 5):
            self.assertEqual(trained_on(seed, subset_seed=3), expected)
        self.assertEqual(trained_on(3, subset_seed=None), expected)
        self.assertNotEqual(trained_on(4, subset_seed=None), expected)
        self.assertEqual(data.labelled_subset(self.dataset, 2, 3, 16), subset)
        with self.assertRaisesRegex(ValueError, "examples_per_class=5.*class 'a'.*only 4"):
            data.train_dataset(self.dataset, 4, 16, examples_per_class=5)

    def test_semi_supervised_zips_a_repeated_unlabeled_stream(self):
        labeled = data.train_dataset(self.dataset, 4, 16, classification_view=False)
        unlabeled = data.unlabeled_dataset(self.dataset, 2, 16, split="val")
        elements = list(data.semi_supervised_dataset(labeled, unlabeled))
        self.assertLen(elements, 3)  # The labelled epoch; the 2 unlabelled batches repeat.
        (x_labeled, y_labeled), x_unlabeled = elements[2]
        self.assertEqual(x_labeled["image"].shape, (4, 16, 16, 3))
        self.assertEqual(y_labeled.shape, (4,))
        self.assertEqual(set(x_unlabeled), {"image"})
        self.assertEqual(x_unlabeled["image"].shape, (2, 16, 16, 3))

    def test_unlabeled_flat_folder(self):
        flat = _temporary_directory(self)
        for i in range(3):
            _write_image(os.path.join(flat, f"{i}.png"), np.full((9, 7, 3), 50, np.uint8), "PNG")
        batches = list(data.unlabeled_dataset(f"folder:{flat}", 2, 16))
        self.assertLen(batches, 1)
        self.assertAllClose(batches[0]["image"], tf.fill([2, 16, 16, 3], 50 / 255), atol=1e-6)

    @parameterized.parameters(2, 3)
    def test_shards_cover_the_epoch_once_and_decode_only_their_share(self, num_shards):
        expected = sorted(value for path, value in self.value.items() if "train" in path)
        seen, decoded = [], []
        for index in range(num_shards):
            stats = data.InputStats()
            shard = data.train_dataset(
                self.dataset, 1, 16, seed=1, drop_remainder=False, num_shards=num_shards,
                shard_index=index, input_stats=stats, classification_view=False,
            )
            for _ in range(2):  # two epochs: the cached share is decoded once
                values = self._values(tf.concat([f["image"] for f, _ in shard], 0))
            seen += values
            self.assertEqual(stats.examples_per_epoch, len(values))
            # Validation pass + the pipeline's one decode, of this share only.
            self.assertEqual(stats.images_decoded, 2 * len(values))
            decoded.append(stats.images_decoded)
        self.assertEqual(sorted(seen), expected)  # every example once, no duplicates
        self.assertLessEqual(max(decoded) - min(decoded), 2)
        with self.assertRaisesRegex(ValueError, "shard_index=3 must be < num_shards=3"):
            data.train_dataset(self.dataset, 1, 16, num_shards=3, shard_index=3)

    def test_sharded_unlabeled_streams_are_disjoint(self):
        values = [
            self._values(batch["image"])
            for index in range(2)
            for batch in data.unlabeled_dataset(
                self.dataset, 6, 16, split="train", num_shards=2, shard_index=index
            )
        ]
        self.assertEqual(sorted(values[0] + values[1]), sorted(
            value for path, value in self.value.items() if "train" in path
        ))

    def test_input_stats_outside_a_strategy_only(self):
        with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
            with self.assertRaisesRegex(ValueError, "outside a tf.distribute strategy scope"):
                data.InputStats()

    def test_argument_errors_name_the_argument(self):
        with self.assertRaisesRegex(ValueError, "batch_size=13 is larger than the 12 examples"):
            data.train_dataset(self.dataset, 13, 16)
        with self.assertRaisesRegex(ValueError, "image_size=0 must be an integer >= 1"):
            data.train_dataset(self.dataset, 4, 0)
        with self.assertRaisesRegex(ValueError, "split='nope'"):
            data.eval_dataset(self.dataset, 4, 16, split="nope")
        shutil.rmtree(os.path.join(self.root, "val"))
        with self.assertRaisesRegex(ValueError, "no validation or test split"):
            data.eval_dataset(self.dataset, 4, 16)


if __name__ == "__main__":
    tf.test.main()
