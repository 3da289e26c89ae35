"""Tests of cgc_tf/data/tfds_source.py: prepared tensorflow-datasets builders as
sources (mocked with `tfds.testing.mock_data`), through the public builders of
`cgc_tf.data`; never downloads."""

import functools
import shutil
import tempfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cgc_tf import data
from tests.testing_base import temporary_directory as _temporary_directory


def _prepared_metadata(name, splits):
    """A data_dir whose dataset_info.json makes `name` look prepared (for mock_data)."""
    root = tempfile.mkdtemp()
    builder = tfds.builder(name, data_dir=root)
    builder.info.set_splits(
        tfds.core.SplitDict(
            [tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0) for s, n in splits.items()]
        )
    )
    tf.io.gfile.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    return root


def _birds_as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    """Mock `_as_dataset` for caltech_birds2011 with valid boxes (tfds's random ones are not)."""
    del split, kwargs
    features = self.info.features
    if isinstance(decoders, tfds.decode.PartialDecoding):
        features = decoders.extract_features(features)
        decoders = decoders.decoders
    rng = np.random.default_rng(0)

    def examples():
        for index in range(5):
            height = 30 + index
            example = {
                "image": rng.integers(0, 256, (height, 40, 3), dtype=np.uint8),
                "label": index % 3,
                "bbox": tfds.features.BBox(0.1, 0.2, 0.6, 0.9),
                "image/filename": f"{index}.jpg",
                "label_name": "bird",
                "segmentation_mask": np.zeros((height, 40, 1), np.uint8),
            }
            yield features.encode_example({key: example[key] for key in features.keys()})

    signature = tf.nest.map_structure(
        lambda info: tf.TensorSpec(info.shape, info.tf_dtype), features.get_serialized_info()
    )
    dataset = tf.data.Dataset.from_generator(examples, output_signature=signature)
    dataset = dataset.map(functools.partial(features.decode_example, decoders=decoders))
    if read_config and read_config.add_tfds_id:
        dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.range(5))).map(
            lambda example, index: {**example, "tfds_id": tf.strings.as_string(index)}
        )
    return dataset


class TfdsTest(tf.test.TestCase):
    def test_mocked_mnist(self):
        root = _prepared_metadata("mnist", {"train": 6, "test": 4})
        self.addCleanup(shutil.rmtree, root, ignore_errors=True)
        with tfds.testing.mock_data(num_examples=6, data_dir=root):
            info = data.dataset_info("mnist", data_dir=root)
            train = data.train_dataset("mnist", 3, 16, data_dir=root)
            evaluation = data.eval_dataset("mnist", 4, 16, data_dir=root)
            batches = list(train)
            eval_batches = list(evaluation)
        self.assertEqual(info.splits, {"train": 6, "test": 4})
        self.assertEqual((info.num_classes, info.eval_split), (10, "test"))
        self.assertFalse(info.has_bounding_boxes)
        self.assertLen(batches, 2)
        features, labels = batches[0]
        self.assertEqual(features["image"].shape, (3, 16, 16, 3))
        self.assertEqual(labels.dtype, tf.int32)
        # MNIST is grayscale: replicated to three equal channels.
        self.assertAllEqual(features["image"][..., 0], features["image"][..., 2])
        self.assertEqual(eval_batches[0][0]["image"].shape, (4, 16, 16, 3))
        with self.assertRaisesRegex(ValueError, "no bounding boxes"):
            with tfds.testing.mock_data(num_examples=6, data_dir=root):
                data.eval_dataset("mnist", 4, 16, data_dir=root, with_boxes=True)

    def test_mocked_caltech_birds_boxes(self):
        root = _prepared_metadata("caltech_birds2011", {"train": 5, "test": 5})
        self.addCleanup(shutil.rmtree, root, ignore_errors=True)
        with tfds.testing.mock_data(as_dataset_fn=_birds_as_dataset, data_dir=root):
            info = data.dataset_info("caltech_birds2011", data_dir=root)
            batches = list(data.eval_dataset("caltech_birds2011", 4, 16, root, with_boxes=True))
        self.assertTrue(info.has_bounding_boxes)
        self.assertEqual(info.num_classes, 200)
        self.assertEqual([b["bbox"].shape for b in batches], [(4, 1, 4), (1, 1, 4)])
        self.assertAllEqual(batches[0]["label"], [0, 1, 2, 0])
        # Image 0 is 30x40: resized to 18x24 (short side round(16 * 256 / 224)),
        # crop offset (1, 4); box (0.1, 0.2, 0.6, 0.9) -> ((1.8-1)/16, (4.8-4)/16, ...).
        self.assertAllClose(batches[0]["bbox"][0, 0], [0.05, 0.05, 0.6125, 1.0], atol=1e-5)

    def test_unprepared_dataset_error_names_data_dir_and_the_fix(self):
        data_dir = _temporary_directory(self)
        with self.assertRaisesRegex(ValueError, "not prepared") as context:
            data.dataset_info("mnist", data_dir=data_dir)
        self.assertIn(data_dir, str(context.exception))
        self.assertIn(f"tfds build mnist --data_dir={data_dir}", str(context.exception))

    def test_manual_download_dataset_error_says_where_to_put_files(self):
        data_dir = _temporary_directory(self)
        with self.assertRaisesRegex(ValueError, "downloads/manual"):
            data.train_dataset("imagenet2012", 4, 16, data_dir=data_dir)

    def test_unknown_dataset_name(self):
        with self.assertRaisesRegex(ValueError, "no_such_dataset_name.*cluttered_digits.*folder:"):
            data.dataset_info("no_such_dataset_name")
        with self.assertRaisesRegex(ValueError, "does not exist"):
            data.dataset_info("folder:/no/such/folder")


if __name__ == "__main__":
    tf.test.main()
