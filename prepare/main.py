"""cgc-prepare: write an image folder as sharded record files, once, for training.

  cgc-prepare --folder=/data/photos --name=photos --data_dir=/data/tfds
  cgc-train --dataset=photos --data_dir=/data/tfds ...

The folder has the `folder:` layout (root/train/<class>/*, optionally
root/val|validation|test/<class>/*). Writes the tensorflow-datasets dataset
<data_dir>/<name>/1.0.0/: per split, TFRecord files of about --shard_mib MiB
holding the encoded image files unchanged, with the class names and per-split
counts. The same folder always gives the same files; an interrupted run leaves
no visible dataset, and running again redoes it. The logic is
`cgc_tf.data.prepare.prepare_folder`; this file only parses flags.
"""

import os
import sys

# Before TensorFlow is imported: hide its C++ INFO and WARNING lines unless asked for.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from cgc_tf import console  # noqa: E402
from cgc_tf.data import prepare  # noqa: E402

_FOLDER = flags.DEFINE_string(
    "folder", None, "Image folder root: root/train/<class>/* and root/val|test/<class>/*."
)
_NAME = flags.DEFINE_string(
    "name", None, "Dataset name to train with (--dataset=NAME): lower-case letters, digits, _."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "tensorflow-datasets data directory to write into (cgc-train --data_dir)."
)
_SHARD_MIB = flags.DEFINE_float(
    "shard_mib", prepare.DEFAULT_SHARD_MIB,
    "Target record file size in MiB (> 0): ceil(split size / this) files per split.",
)
_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards", None, "Record files per split instead of --shard_mib (>= 1)."
)
_SKIP_CORRUPT_IMAGES = flags.DEFINE_bool(
    "skip_corrupt_images", False,
    "Leave corrupt image files out (listed in metadata.json) instead of failing.",
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Redo a dataset that is already prepared.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    for flag in (_FOLDER, _NAME, _DATA_DIR):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")
    console.setup(verbose=flags.FLAGS["verbosity"].present)
    try:
        builder = prepare.prepare_folder(
            _FOLDER.value,
            _NAME.value,
            _DATA_DIR.value,
            shard_mib=_SHARD_MIB.value,
            num_shards=_NUM_SHARDS.value,
            skip_corrupt_images=_SKIP_CORRUPT_IMAGES.value,
            overwrite=_OVERWRITE.value,
        )
    except (ValueError, OSError) as error:
        sys.exit(f"cgc-prepare: {error}")
    print(prepare.format_summary(builder))
    print(f"train with: cgc-train --dataset={_NAME.value} --data_dir={_DATA_DIR.value}")


def run():
    """Console-script entry point (cgc-prepare)."""
    console.prepare_binary(flags.FLAGS, sys.modules[__name__])
    app.run(main)


if __name__ == "__main__":
    run()
