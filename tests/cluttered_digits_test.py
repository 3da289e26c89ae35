"""Tests for cgc_tf.data.cluttered_digits: the embedded default tfds dataset (its
renderer, canvas.py: canvas_test.py)."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import shutil  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from cgc_tf.data import cluttered_digits  # noqa: E402

# Examples compared image by image; whole splits are only checked through their
# small features (source_index, label, bbox), which keeps the file fast.
COMPARED_EXAMPLES = 32
REGENERATED_EXAMPLES = 6
EXPECTED_SPLIT_SIZES = {"train": 5_748, "test": 720}
EXPECTED_SOURCE_DIGITS = {"train": 1_437, "test": 360}


def _first_examples(dataset, count):
    """The first `count` examples as a list of numpy feature dicts."""
    return list(dataset.take(count).as_numpy_iterator())


def _all_cheap_features(prepared_builder, split):
    """source_index, label, bbox of a whole split (images are not decoded)."""
    dataset = prepared_builder.as_dataset(
        split=split, decoders={"image": tfds.decode.SkipDecoding()}
    )
    dataset = dataset.map(lambda ex: (ex["source_index"], ex["label"], ex["bbox"]))
    return next(iter(dataset.batch(10_000).as_numpy_iterator()))


@pytest.mark.slow  # builds the 48x48 dataset twice
class ClutteredDigitsDatasetTest(tf.test.TestCase):
    """Checks on the prepared dataset (default 48x48 config, built twice)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.first_data_dir = tempfile.mkdtemp(prefix="cluttered_digits_a_")
        cls.second_data_dir = tempfile.mkdtemp(prefix="cluttered_digits_b_")
        cls.builder = cluttered_digits.builder(data_dir=cls.first_data_dir)
        # The second build goes through plain tfds.load: importing the package
        # must be all it takes for tfds to find (and prepare) the dataset.
        cls.second_build = {
            split: tfds.load("cluttered_digits", split=split, data_dir=cls.second_data_dir)
            for split in ("train", "test")
        }
        cls.cheap_features = {
            split: _all_cheap_features(cls.builder, split) for split in ("train", "test")
        }

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.first_data_dir, ignore_errors=True)
        shutil.rmtree(cls.second_data_dir, ignore_errors=True)
        super().tearDownClass()

    def test_registered_with_default_config_and_features(self):
        self.assertIn("cluttered_digits", tfds.list_builders())
        self.assertEqual(self.builder.builder_config.name, "size48")
        features = self.builder.info.features
        self.assertEqual(features["image"].shape, (48, 48, 3))
        self.assertEqual(features["image"].dtype, np.uint8)
        self.assertEqual(features["label"].names, [str(digit) for digit in range(10)])
        self.assertEqual(features["source_index"].dtype, np.int32)
        self.assertEqual(self.builder.info.supervised_keys, ("image", "label"))
        self.assertEqual(str(self.builder.info.version), "1.0.0")

    def test_split_sizes(self):
        for split, expected in EXPECTED_SPLIT_SIZES.items():
            self.assertEqual(self.builder.info.splits[split].num_examples, expected)

    def test_two_builds_are_identical(self):
        for split in ("train", "test"):
            first = _first_examples(
                cluttered_digits.load(split, data_dir=self.first_data_dir), COMPARED_EXAMPLES
            )
            second = _first_examples(self.second_build[split], COMPARED_EXAMPLES)
            self.assertLen(first, COMPARED_EXAMPLES)
            self.assertLen(second, COMPARED_EXAMPLES)
            for first_example, second_example in zip(first, second):
                for key in ("image", "label", "bbox", "source_index"):
                    self.assertAllEqual(first_example[key], second_example[key], msg=key)

    def test_splits_are_disjoint_by_source_digit(self):
        sources = {}
        for split, placements in cluttered_digits.PLACEMENTS_PER_DIGIT.items():
            source_index, _, _ = self.cheap_features[split]
            unique, counts = np.unique(source_index, return_counts=True)
            self.assertLen(unique, EXPECTED_SOURCE_DIGITS[split])
            # Every source digit of the split appears in exactly `placements` examples.
            self.assertAllEqual(counts, np.full_like(counts, placements))
            self.assertAllEqual(unique, cluttered_digits.split_source_indices(split))
            sources[split] = set(unique.tolist())
        self.assertEmpty(sources["train"] & sources["test"])
        self.assertEqual(sources["train"] | sources["test"], set(range(1_797)))

    def test_labels_are_the_source_digits_classes_and_cover_all_classes(self):
        _, source_labels = cluttered_digits.load_source_digits()
        for split in ("train", "test"):
            source_index, label, _ = self.cheap_features[split]
            self.assertAllInRange(label, 0, 9)
            self.assertAllEqual(label, source_labels[source_index])
            self.assertEqual(set(label.tolist()), set(range(10)))

    def test_every_bbox_is_a_proper_box_inside_the_image(self):
        for split in ("train", "test"):
            _, _, bbox = self.cheap_features[split]
            self.assertAllInRange(bbox, 0.0, 1.0)
            heights = bbox[:, 2] - bbox[:, 0]
            widths = bbox[:, 3] - bbox[:, 1]
            # Digits are 40%-70% of the canvas; their ink is never a sliver.
            self.assertGreater(heights.min(), 0.2)
            self.assertGreater(widths.min(), 0.05)
            self.assertLessEqual(heights.max(), round(0.7 * 48) / 48 + 1e-6)

    def test_stored_examples_are_regenerated_exactly_and_bbox_covers_the_ink(self):
        for split in ("train", "test"):
            stored = _first_examples(
                cluttered_digits.load(split, data_dir=self.first_data_dir),
                REGENERATED_EXAMPLES,
            )
            for example in stored:
                source_index = int(example["source_index"])
                matches = []
                for placement in range(cluttered_digits.PLACEMENTS_PER_DIGIT[split]):
                    regenerated, ink_mask = cluttered_digits.generate_example(
                        split, source_index, placement, image_size=48
                    )
                    if np.array_equal(regenerated["image"], example["image"]):
                        matches.append((regenerated, ink_mask))
                self.assertLen(matches, 1, msg=f"{split} example of source {source_index}")
                regenerated, ink_mask = matches[0]
                self.assertEqual(regenerated["label"], example["label"])
                self.assertAllClose(regenerated["bbox"], example["bbox"], atol=1e-6)
                self._assert_bbox_tightly_covers_visible_ink(
                    example["image"], example["bbox"], ink_mask
                )

    def _assert_bbox_tightly_covers_visible_ink(self, image, bbox, ink_mask):
        size = image.shape[0]
        top, left, bottom, right = np.rint(bbox * size).astype(int)
        inside = np.zeros_like(ink_mask)
        inside[top:bottom, left:right] = True
        self.assertGreater(ink_mask.sum(), 0)
        self.assertEqual(np.sum(ink_mask & ~inside), 0)
        # Tight: the ink reaches all four edges of the box.
        self.assertTrue(ink_mask[top].any() and ink_mask[bottom - 1].any())
        self.assertTrue(ink_mask[:, left].any() and ink_mask[:, right - 1].any())
        # Visible: ink pixels differ clearly from the background, taken as the
        # most common colour of the image.
        colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
        background = colours[np.argmax(counts)].astype(float)
        ink_colour = image[ink_mask].astype(float).mean(axis=0)
        self.assertGreater(np.abs(ink_colour - background).max(), 30.0)


class ConfigTest(tf.test.TestCase):
    def test_predefined_configs(self):
        names = [config.name for config in cluttered_digits.ClutteredDigits.BUILDER_CONFIGS]
        self.assertEqual(names, ["size48", "size64"])
        self.assertIs(
            cluttered_digits.config_for_size(64),
            cluttered_digits.ClutteredDigits.BUILDER_CONFIGS[1],
        )

    def test_custom_size_gets_a_custom_config(self):
        config = cluttered_digits.config_for_size(32)
        self.assertEqual(config.name, "size32")
        self.assertEqual(config.image_size, 32)
        data_dir = self.get_temp_dir()
        via_tfds = tfds.builder(
            "cluttered_digits",
            config=cluttered_digits.ClutteredDigitsConfig(name="size32", image_size=32),
            data_dir=data_dir,
        )
        self.assertEqual(via_tfds.info.features["image"].shape, (32, 32, 3))
        self.assertIn(os.path.join("cluttered_digits", "size32"), str(via_tfds.data_dir))

    def test_split_source_indices_are_a_fixed_partition(self):
        train = cluttered_digits.split_source_indices("train")
        test = cluttered_digits.split_source_indices("test")
        self.assertEqual(train.shape, (1_437,))
        self.assertEqual(test.shape, (360,))
        self.assertEmpty(np.intersect1d(train, test))
        self.assertAllEqual(np.sort(np.concatenate([train, test])), np.arange(1_797))
        self.assertAllEqual(train, cluttered_digits.split_source_indices("train"))
        with self.assertRaisesRegex(ValueError, "split must be one of"):
            cluttered_digits.split_source_indices("validation")

    def test_generate_example_rejects_foreign_source_digit(self):
        test_digit = int(cluttered_digits.split_source_indices("test")[0])
        with self.assertRaisesRegex(ValueError, "source_index must be a source digit"):
            cluttered_digits.generate_example("train", test_digit, 0, 32)
        train_digit = int(cluttered_digits.split_source_indices("train")[0])
        with self.assertRaisesRegex(ValueError, "placement must be in"):
            cluttered_digits.generate_example("train", train_digit, 4, 32)


if __name__ == "__main__":
    tf.test.main()
