"""Tests for cgc_tf.data.elpv: the solar-cell tfds builder and its dataset names.

Most tests build from a small fake package directory (labels.csv + 300x300
PNGs), so they run without the optional elpv-dataset package; the checks on
the real labels.csv are skipped when it is not installed.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import collections  # noqa: E402
import importlib.util  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from unittest import mock  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from cgc_tf import data  # noqa: E402
from cgc_tf.data import elpv  # noqa: E402
from cgc_tf.data.elpv import elpv as elpv_module  # noqa: E402

HAS_PACKAGE = importlib.util.find_spec("elpv_dataset") is not None
LEVEL_NAMES = ("0.0", "0.3333333333333333", "0.6666666666666666", "1.0")
# Cells per (level, type) stratum of the fake directory: uneven sizes, so that
# round-half-up matters (6 * 0.25 = 1.5 -> 2; 5 * 0.25 = 1.25 -> 1).
FAKE_STRATA = {(0, "mono"): 6, (0, "poly"): 5, (1, "mono"): 3, (1, "poly"): 2,
               (2, "mono"): 2, (2, "poly"): 1, (3, "mono"): 4, (3, "poly"): 7}


def _round_half_up(value):
    return int(np.floor(value + 0.5))


def _write_fake_package(directory):
    """labels.csv and images/cellNNNN.png like elpv-dataset's, strata interleaved."""
    os.makedirs(os.path.join(directory, "images"))
    rows = [key for key, count in FAKE_STRATA.items() for _ in range(count)]
    order = np.random.default_rng(0).permutation(len(rows))
    lines = []
    for number, row in enumerate(order, start=1):
        level, cell_type = rows[row]
        name = f"images/cell{number:04d}.png"
        # A gradient plus the row number: distinct, compressible images.
        pixels = (np.add.outer(np.arange(300), np.arange(300)) // 3 + number) % 256
        Image.fromarray(pixels.astype(np.uint8), mode="L").save(os.path.join(directory, name))
        lines.append(f"{name}  {LEVEL_NAMES[level]}  {cell_type}")
    with open(os.path.join(directory, "labels.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _cells(strata):
    """In-memory cells with the given stratum sizes (no files)."""
    cells = []
    for (level, cell_type), count in strata.items():
        for _ in range(count):
            cells.append(elpv.Cell(len(cells), f"/x/cell{len(cells):04d}.png",
                                   elpv.PROBABILITY_LEVELS[level], cell_type))
    return tuple(cells)


def _strata_counts(cells, indices):
    return collections.Counter((cells[i].level, cells[i].cell_type) for i in indices)


class SplitTest(tf.test.TestCase):
    def test_partition_and_stratification(self):
        strata = {(0, "mono"): 41, (0, "poly"): 18, (1, "mono"): 6, (2, "poly"): 3,
                  (3, "mono"): 10, (3, "poly"): 1}
        cells = _cells(strata)
        rows = elpv.split_indices(cells)
        everything = set(range(len(cells)))
        self.assertEqual(set(rows["train"]) | set(rows["test"]), everything)
        self.assertEmpty(set(rows["train"]) & set(rows["test"]))
        self.assertEqual(set(rows["holdout_train"]) | set(rows["validation"]), set(rows["train"]))
        self.assertEmpty(set(rows["holdout_train"]) & set(rows["validation"]))
        test_counts = _strata_counts(cells, rows["test"])
        validation_counts = _strata_counts(cells, rows["validation"])
        for key, count in strata.items():
            expected_test = _round_half_up(count * 0.25)
            self.assertEqual(test_counts[key], expected_test, key)
            self.assertEqual(validation_counts[key], _round_half_up((count - expected_test) * 0.2), key)
        for name in rows:
            self.assertAllEqual(rows[name], np.sort(rows[name]))

    def test_deterministic_and_seeded(self):
        cells = _cells({(0, "mono"): 40, (3, "poly"): 40})
        first, again = elpv.split_indices(cells), elpv.split_indices(cells)
        other = elpv.split_indices(cells, seed=1)
        for name in first:
            self.assertAllEqual(first[name], again[name])
        self.assertNotAllEqual(first["test"], other["test"])

    def test_probability_levels_and_labels(self):
        self.assertEqual(elpv.probability_level(0.3333333333333333), 1)
        self.assertEqual(elpv.probability_level(2 / 3), 2)
        with self.assertRaisesRegex(ValueError, "0.5 is not one of"):
            elpv.probability_level(0.5)
        labels = [elpv.Cell(0, "/c.png", p, "mono").label for p in elpv.PROBABILITY_LEVELS]
        self.assertEqual(labels, [0, 0, 1, 1])  # defective iff probability >= 1/2

    def test_dataset_names(self):
        self.assertEqual(elpv.config_for_name("elpv").name, "all")
        config = elpv.config_for_name("elpv_mono_holdout")
        self.assertEqual((config.name, config.cell_type, config.holdout), ("mono_holdout", "mono", True))
        self.assertEqual(elpv.config_for_name("elpv_poly").cell_type, "poly")
        for bad in ("elpv_foo", "elpv_holdout_mono", "cluttered_digits", None):
            with self.assertRaisesRegex(ValueError, "not an elpv name"):
                elpv.config_for_name(bad)

    def test_malformed_labels_file(self):
        directory = self.get_temp_dir()
        with open(os.path.join(directory, "labels.csv"), "w") as f:
            f.write("images/cell0001.png 1.0 amorphous\n")
        with self.assertRaisesRegex(ValueError, "line 1: expected"):
            elpv.read_cells(directory)

    def test_real_labels_split_sizes(self):
        if not HAS_PACKAGE:
            self.skipTest("elpv-dataset is not installed (pip install -e '.[elpv]')")
        cells = elpv.read_cells(elpv.source_directory())
        self.assertLen(cells, 2_624)
        self.assertEqual(collections.Counter(c.cell_type for c in cells),
                         {"mono": 1_074, "poly": 1_550})
        rows = elpv.split_indices(cells)
        strata = _strata_counts(cells, range(len(cells)))
        expected_test = {key: _round_half_up(n * 0.25) for key, n in strata.items()}
        self.assertEqual(dict(_strata_counts(cells, rows["test"])), expected_test)
        self.assertEqual(
            {name: len(indices) for name, indices in rows.items()},
            {"train": 1_967, "test": 657, "holdout_train": 1_574, "validation": 393},
        )


class BuilderTest(tf.test.TestCase):
    """Prepares configs from the fake package directory."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.source = tempfile.mkdtemp(prefix="elpv_source_")
        cls.data_dir = tempfile.mkdtemp(prefix="elpv_tfds_")
        _write_fake_package(cls.source)
        elpv.read_cells.cache_clear()
        cls.patch = mock.patch.object(elpv_module, "source_directory", lambda: cls.source)
        cls.patch.start()
        cls.cells = elpv.read_cells(cls.source)
        cls.rows = elpv.split_indices(cls.cells)

    @classmethod
    def tearDownClass(cls):
        cls.patch.stop()
        elpv.read_cells.cache_clear()
        shutil.rmtree(cls.source, ignore_errors=True)
        shutil.rmtree(cls.data_dir, ignore_errors=True)
        super().tearDownClass()

    def _ids(self, split, name):
        dataset = elpv.builder(self.data_dir, name).as_dataset(
            split=split, decoders={"image": tfds.decode.SkipDecoding()}
        )
        return sorted(example["cell_id"].decode() for example in dataset.as_numpy_iterator())

    def _expected_ids(self, rows, cell_type):
        return sorted(self.cells[i].cell_id for i in rows
                      if cell_type in ("all", self.cells[i].cell_type))

    def test_splits_of_every_config(self):
        for name, cell_type in (("elpv", "all"), ("elpv_mono", "mono"), ("elpv_poly", "poly")):
            self.assertEqual(self._ids("train", name), self._expected_ids(self.rows["train"], cell_type))
            self.assertEqual(self._ids("test", name), self._expected_ids(self.rows["test"], cell_type))
            holdout = name + "_holdout"
            self.assertEqual(self._ids("train", holdout),
                             self._expected_ids(self.rows["holdout_train"], cell_type))
            self.assertEqual(self._ids("validation", holdout),
                             self._expected_ids(self.rows["validation"], cell_type))
            self.assertEqual(self._ids("test", holdout), self._ids("test", name))

    def test_features_are_the_source_cells(self):
        by_id = {cell.cell_id: cell for cell in self.cells}
        test = elpv.load("test", name="elpv", data_dir=self.data_dir)
        seen = 0
        for example in test.as_numpy_iterator():
            cell = by_id[example["cell_id"].decode()]
            with Image.open(cell.path) as image:
                self.assertAllEqual(example["image"][..., 0], np.asarray(image))
            self.assertEqual(example["image"].shape, (300, 300, 1))
            self.assertEqual(example["label"], int(cell.probability >= 0.5))
            self.assertAllClose(example["defect_probability"], cell.probability)
            self.assertEqual(elpv.CELL_TYPES[example["cell_type"]], cell.cell_type)
            seen += 1
        self.assertLen(self.rows["test"], seen)

    def test_pipeline_feeds_three_equal_channels(self):
        info = data.dataset_info("elpv_mono", data_dir=self.data_dir)
        self.assertEqual(info.class_names, ("functional", "defective"))
        self.assertEqual(info.eval_split, "test")
        self.assertEqual(data.dataset_info("elpv_mono_holdout", data_dir=self.data_dir).eval_split,
                         "validation")
        images, labels = next(iter(data.eval_dataset("elpv_mono", 4, 32, data_dir=self.data_dir)))
        images = images["image"]
        self.assertEqual(images.shape, (4, 32, 32, 3))
        self.assertAllEqual(images[..., 0], images[..., 1])
        self.assertAllEqual(images[..., 0], images[..., 2])
        self.assertAllInSet(labels.numpy(), [0, 1])

    def test_missing_package_fails_in_one_line(self):
        fresh = tempfile.mkdtemp(dir=self.get_temp_dir())
        self.patch.stop()
        try:
            with mock.patch.object(importlib.util, "find_spec", return_value=None):
                with self.assertRaises(ValueError) as caught:
                    data.dataset_info("elpv_poly", data_dir=fresh)
        finally:
            self.patch.start()
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertIn('pip install -e ".[elpv]"', message)
        # A prepared copy is readable without the package.
        elpv.builder(self.data_dir, "elpv")
        with mock.patch.object(importlib.util, "find_spec", return_value=None):
            self.assertEqual(data.dataset_info("elpv", data_dir=self.data_dir).num_classes, 2)


if __name__ == "__main__":
    tf.test.main()
