"""The tfds builder of `elpv`: electroluminescence images of solar cells (real photographs).

What: the 2,624 cells of the PyPI package `elpv-dataset` (Deitsch et al., CC
BY-NC-SA 4.0), 300x300 uint8 grayscale [300, 300, 1], stored byte for byte from
the installed package (nothing downloaded); label defective (defect probability
>= 1/2) vs functional, the four-level probability kept as a feature. Splits are
stratified by (probability level, cell type) with fixed seeds; `mono` / `poly`
configs keep one cell type. Why, and the exact split rule: README.md beside
this module.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import os
from typing import Iterator

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

DEFAULT_SEED = 20_190_401
"""Base seed of the stratified split permutations."""

SOURCE_PACKAGE = "elpv-dataset"
SOURCE_MODULE = "elpv_dataset"
INSTALL_HINT = 'pip install -e ".[elpv]" (or pip install elpv-dataset)'

IMAGE_SIDE = 300
TEST_FRACTION = 0.25
VALIDATION_FRACTION = 0.2
# A cell is defective when the experts' defect probability is at least this.
DEFECTIVE_THRESHOLD = 0.5
PROBABILITY_LEVELS = (0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0)
CELL_TYPES = ("mono", "poly")
CLASS_NAMES = ("functional", "defective")

_DESCRIPTION = """\
Electroluminescence images of 2,624 solar cells (300x300 grayscale) cut from 44
photovoltaic modules, 1,074 monocrystalline and 1,550 polycrystalline, from the
PyPI package elpv-dataset. Label: defective (expert defect probability >= 1/2)
or functional. Features: the image, the label, the four-level defect
probability, the cell type and the cell id. Train and test are split 75 / 25
stratified by probability level and cell type, with a fixed seed.
"""

_CITATION = """\
@article{Deitsch2019,
  author  = {Deitsch, Sergiu and Christlein, Vincent and Berger, Stephan and Buerhop-Lutz, Claudia and Maier, Andreas and Gallwitz, Florian and Riess, Christian},
  title   = {Automatic classification of defective photovoltaic module cells in electroluminescence images},
  journal = {Solar Energy},
  volume  = {185},
  pages   = {455--468},
  year    = {2019},
  doi     = {10.1016/j.solener.2019.02.067}
}
"""


class MissingSourceError(ValueError):
    """The optional package with the images is not installed (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One row of the package's labels.csv.

    Attributes:
      index: int, 0-based row in labels.csv.
      path: str, absolute path of the PNG.
      probability: float in PROBABILITY_LEVELS, the experts' defect probability.
      cell_type: "mono" or "poly".
    """

    index: int
    path: str
    probability: float
    cell_type: str

    @property
    def cell_id(self):
        """str, the image file's stem, e.g. "cell0001"."""
        return os.path.splitext(os.path.basename(self.path))[0]

    @property
    def label(self):
        """int, 1 (defective) or 0 (functional)."""
        return int(self.probability >= DEFECTIVE_THRESHOLD)

    @property
    def level(self):
        """int in [0, 3], the index of the probability in PROBABILITY_LEVELS."""
        return probability_level(self.probability)


def probability_level(probability):
    """Index in PROBABILITY_LEVELS of a labels.csv probability (float, 1e-6 tolerance).

    Raises:
      ValueError: if `probability` is not one of the four levels.
    """
    distances = np.abs(np.asarray(PROBABILITY_LEVELS) - float(probability))
    level = int(np.argmin(distances))
    if distances[level] > 1e-6:
        raise ValueError(
            f"defect probability {probability!r} is not one of {list(PROBABILITY_LEVELS)}"
        )
    return level


def source_directory():
    """The `data` directory of the installed `elpv-dataset` package.

    Returns:
      str, a directory holding labels.csv and images/.

    Raises:
      MissingSourceError: if the package is not installed.
    """
    spec = importlib.util.find_spec(SOURCE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingSourceError(
            f"dataset 'elpv' needs the optional package {SOURCE_PACKAGE} (data licence "
            f"CC BY-NC-SA 4.0): {INSTALL_HINT}"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


@functools.lru_cache(maxsize=4)
def read_cells(directory):
    """The cells listed in `directory`/labels.csv, in file order.

    Args:
      directory: str, a directory with labels.csv ("images/cellNNNN.png
        <probability> <mono|poly>" per line, whitespace separated) and the images.

    Returns:
      tuple of `Cell`.

    Raises:
      ValueError: on a malformed line, an unknown cell type or probability.
    """
    cells = []
    with open(os.path.join(directory, "labels.csv")) as f:
        for line_number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3 or fields[2] not in CELL_TYPES:
                raise ValueError(
                    f"labels.csv line {line_number}: expected '<path> <probability> "
                    f"<{'|'.join(CELL_TYPES)}>', got {line.strip()!r}"
                )
            probability = PROBABILITY_LEVELS[probability_level(float(fields[1]))]
            cells.append(
                Cell(len(cells), os.path.join(directory, fields[0]), probability, fields[2])
            )
    return tuple(cells)


def check_image(path):
    """Checks that `path` is a 300x300 8-bit grayscale PNG (reads the header only).

    Raises:
      ValueError: naming the file and what it is instead.
    """
    with Image.open(path) as image:
        found = (image.format, image.mode, image.size)
    if found != ("PNG", "L", (IMAGE_SIDE, IMAGE_SIDE)):
        raise ValueError(
            f"{path}: expected a {IMAGE_SIDE}x{IMAGE_SIDE} 8-bit grayscale PNG "
            f"(format, mode, size) = ('PNG', 'L', ({IMAGE_SIDE}, {IMAGE_SIDE})), got {found}"
        )


def _stratum(cell):
    """int in [0, 8): the (probability level, cell type) stratum of a cell."""
    return cell.level * len(CELL_TYPES) + CELL_TYPES.index(cell.cell_type)


def _round_half_up(value):
    return int(np.floor(value + 0.5))


def _stratified_pick(indices_by_stratum, fraction, seed_offset, seed):
    """Per stratum, round(n * fraction) indices drawn by a fixed permutation."""
    picked = []
    for stratum, indices in sorted(indices_by_stratum.items()):
        order = np.random.default_rng([seed, seed_offset + stratum]).permutation(len(indices))
        count = _round_half_up(len(indices) * fraction)
        picked.extend(np.asarray(indices)[order[:count]].tolist())
    return set(picked)


def split_indices(cells, seed=DEFAULT_SEED):
    """The labels.csv rows of every split, stratified by probability level and type.

    Args:
      cells: sequence of `Cell` (from `read_cells`).
      seed: int, base seed of the permutations.

    Returns:
      dict with "train", "test", and the holdout partition of train,
      "holdout_train" and "validation": each an int64 array of row indices,
      sorted ascending. train and test partition all rows; holdout_train and
      validation partition train.
    """
    by_stratum = {}
    for cell in cells:
        by_stratum.setdefault(_stratum(cell), []).append(cell.index)
    test = _stratified_pick(by_stratum, TEST_FRACTION, 0, seed)
    train_by_stratum = {
        stratum: [index for index in indices if index not in test]
        for stratum, indices in by_stratum.items()
    }
    # Offsets 8..15: streams disjoint from the test split's 0..7.
    validation = _stratified_pick(
        train_by_stratum, VALIDATION_FRACTION, len(PROBABILITY_LEVELS) * len(CELL_TYPES), seed
    )
    train = [cell.index for cell in cells if cell.index not in test]
    as_array = lambda rows: np.asarray(sorted(rows), dtype=np.int64)  # noqa: E731
    return {
        "train": as_array(train),
        "test": as_array(test),
        "holdout_train": as_array(index for index in train if index not in validation),
        "validation": as_array(validation),
    }


@dataclasses.dataclass(eq=False)
class ElpvConfig(tfds.core.BuilderConfig):
    """Builder config of `elpv`.

    Attributes:
      cell_type: "all", "mono" or "poly": the cells every split keeps.
      holdout: bool; True splits train into train and validation.
    """

    cell_type: str = "all"
    holdout: bool = False


def _config_name(cell_type, holdout):
    return cell_type + ("_holdout" if holdout else "")


class Elpv(tfds.core.GeneratorBasedBuilder):
    """tfds builder of `elpv` (see the module docstring and README.md)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": (
            "Initial release: the 2,624 cells of elpv-dataset 1.0.0.post1, defective "
            "(probability >= 1/2) vs functional, 75/25 train/test stratified by "
            "probability level and cell type."
        ),
    }
    BUILDER_CONFIGS = [
        ElpvConfig(
            name=_config_name(cell_type, holdout),
            cell_type=cell_type,
            holdout=holdout,
            description=(
                f"{'All' if cell_type == 'all' else cell_type.capitalize() + 'crystalline'} "
                f"cells{'; train split into train and validation' if holdout else ''}."
            ),
        )
        for cell_type in ("all",) + CELL_TYPES
        for holdout in (False, True)
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """epath.Path of this module (see ClutteredDigits.code_path for why)."""
        return epath.Path(inspect.getfile(cls))

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(IMAGE_SIDE, IMAGE_SIDE, 1), dtype=np.uint8,
                        encoding_format="png",
                    ),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                    "defect_probability": tfds.features.Scalar(
                        dtype=np.float32,
                        doc="Experts' defect probability: 0, 1/3, 2/3 or 1.",
                    ),
                    "cell_type": tfds.features.ClassLabel(names=list(CELL_TYPES)),
                    "cell_id": tfds.features.Text(
                        doc="Image file stem in elpv-dataset, e.g. 'cell0001'."
                    ),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zae-bayern/elpv-dataset",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The images come from the installed package.
        cells = read_cells(source_directory())
        rows = split_indices(cells)
        if self.builder_config.holdout:
            chosen = {
                "train": rows["holdout_train"],
                "validation": rows["validation"],
                "test": rows["test"],
            }
        else:
            chosen = {"train": rows["train"], "test": rows["test"]}
        return {split: self._generate_examples(cells, indices) for split, indices in chosen.items()}

    def _generate_examples(self, cells, indices) -> Iterator[tuple[str, dict]]:
        cell_type = self.builder_config.cell_type
        for index in indices.tolist():
            cell = cells[index]
            if cell_type != "all" and cell.cell_type != cell_type:
                continue
            check_image(cell.path)
            yield cell.cell_id, {
                # The file itself: tfds stores a path's bytes unchanged.
                "image": cell.path,
                "label": cell.label,
                "defect_probability": np.float32(cell.probability),
                "cell_type": cell.cell_type,
                "cell_id": cell.cell_id,
            }


def config_for(cell_type="all", holdout=False):
    """The predefined `ElpvConfig` of a cell type and holdout choice.

    Raises:
      ValueError: if `cell_type` is not "all", "mono" or "poly".
    """
    name = _config_name(cell_type, bool(holdout))
    for config in Elpv.BUILDER_CONFIGS:
        if config.name == name:
            return config
    raise ValueError(f"cell_type={cell_type!r} must be one of {['all', *CELL_TYPES]}")
