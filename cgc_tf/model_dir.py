"""The model_dir layout: its file names, atomic writes, and how a saved model is found.

What: one name per file or folder that training writes and evaluation, export
and the binaries read (docs/architecture.md describes each); `atomic_write_path`
and `write_json`, through which every file of a run is written; `model_file`,
`read_config` and `load_model`, the one rule for finding and loading a saved
model. Why: a reader or writer that restates a name drifts from the others, and
a file written in place is torn by a kill. Standard library only (Keras is
imported by `load_model` when called).
"""

import contextlib
import json
import os

CONFIG_FILE = "config.json"
MODEL_FILE = "model.keras"
# The final backbone alone, loadable as another run's `init_weights`.
BACKBONE_WEIGHTS_FILE = "backbone.weights.h5"
METRICS_FILE = "metrics.json"
LOG_FILE = "log.csv"
CHECKPOINT_DIR = "checkpoints"
# Keras fit's resume state (PreemptibleBackupAndRestore).
BACKUP_DIR = os.path.join(CHECKPOINT_DIR, "backup")
EPOCH_MODEL_FILE = os.path.join(CHECKPOINT_DIR, "last_epoch.keras")
# strategy='multi_worker''s resume state (custom_loop), instead of the two above.
MULTI_WORKER_DIR = os.path.join(CHECKPOINT_DIR, "multi_worker")
TENSORBOARD_DIR = "tensorboard"
HEATMAPS_DIR = os.path.join(TENSORBOARD_DIR, "heatmaps")
LABELLED_SUBSET_FILE = "labelled_subset.json"
INPUT_STATS_DIR = "input_stats"
# cgc-evaluate --protocol=paper writes its metrics.json here.
PAPER_PROTOCOL_DIR = "paper_protocol"
# cgc-export's default destination.
EXPORT_DIR = "export"


def input_stats_file(shard_index):
    """The input statistics of input pipeline (worker) `shard_index`, relative to model_dir."""
    return os.path.join(INPUT_STATS_DIR, f"worker-{shard_index}.json")


def remove_if_exists(path):
    """Deletes the file `path`; a missing file is not an error."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync(path):
    """Flushes the file or directory `path` to disk (POSIX only; elsewhere a no-op)."""
    if os.name != "posix":
        return  # Windows cannot fsync a directory or a read-only descriptor.
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _commit(temporary_path, path):
    """Renames the complete file `temporary_path` to `path` in one atomic step.

    The fsyncs make the rename durable across a power loss too (a SIGKILL alone
    loses nothing the process wrote: the data is already in the page cache).
    """
    _fsync(temporary_path)
    os.replace(temporary_path, path)
    _fsync(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_write_path(path):
    """Yields a temporary path beside `path`; a block that ends normally replaces `path` with it.

    Readers of `path` see either the previous complete file or the new complete
    one, whenever the process is killed. The temporary name keeps the suffix
    after the first dot of the file name ("last_epoch.keras" ->
    "last_epoch.partial.keras"), so Keras's suffix checks still pass. A temporary
    file left by an earlier kill is deleted first; a block that raises deletes
    its own.

    Args:
      path: the destination file; its directory is created if needed.

    Yields:
      str: where to write the new file.
    """
    directory, name = os.path.split(path)
    stem, _, suffix = name.partition(".")
    temporary_path = os.path.join(directory, f"{stem}.partial.{suffix}")
    os.makedirs(directory or ".", exist_ok=True)
    # A fresh inode: a leftover may be a hard link to a committed file, which
    # writing in place would change.
    remove_if_exists(temporary_path)
    try:
        yield temporary_path
    except BaseException:
        remove_if_exists(temporary_path)
        raise
    _commit(temporary_path, path)


def _json_default(value):
    # NumPy scalars (np.float32 metrics, np.int64 counts) are written as numbers.
    item = getattr(value, "item", None)
    if item is not None and getattr(value, "shape", None) == ():
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(path, value):
    """Writes `value` as indented, key-sorted JSON to `path`, atomically.

    The text is built before the file is opened, so a value that is not
    serialisable leaves `path` untouched; a kill mid-write leaves the previous
    file whole (`atomic_write_path`).

    Args:
      path: destination file; its directory is created if needed.
      value: JSON-serialisable data; NumPy scalars are written as numbers.

    Raises:
      TypeError: `value` holds something JSON cannot represent.
    """
    text = json.dumps(value, indent=2, sort_keys=True, default=_json_default) + "\n"
    with atomic_write_path(os.fspath(path)) as temporary_path:
        with open(temporary_path, "w", encoding="utf-8") as f:
            f.write(text)


def model_file(path):
    """The `.keras` file a path names: the file itself, or `model_dir/model.keras`.

    Args:
      path: a `.keras` file or a model_dir written by training (str or PathLike).

    Returns:
      str: the path of an existing `.keras` file.

    Raises:
      ValueError: `path` is neither.
    """
    path = os.fspath(path)
    candidate = os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path
    if not (candidate.endswith(".keras") and os.path.isfile(candidate)):
        raise ValueError(
            f"model={path!r} must be a '.keras' file or a model_dir containing {MODEL_FILE!r}; "
            f"it is neither (no such file {candidate!r})"
        )
    return candidate


def read_config(path):
    """The dict of `config.json` beside a model (its model_dir, or the folder of its file), or {}.

    Args:
      path: a model_dir or a file in one (str or PathLike).
    """
    path = os.fspath(path)
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        return {}
    with open(config_path, encoding="utf-8") as f:
        return json.load(f)


def load_model(path):
    """Loads the Keras model of a `.keras` file or a model_dir, without compiling it.

    Evaluation and export only run the forward pass and Grad-CAM, so the
    optimizer state is not restored. Importing `cgc_tf` registered `CGCModel`
    and `PairedAugmentation` for deserialisation.

    Args:
      path: as `model_file`.

    Returns:
      keras.Model: a `cgc_tf.CGCModel` for a model training saved.

    Raises:
      ValueError: as `model_file`.
    """
    import keras  # Here, so that the names above are readable without Keras.

    return keras.saving.load_model(model_file(path), compile=False)
