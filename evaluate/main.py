"""cgc-evaluate: accuracy and explanation metrics of a trained model, and a PNG grid.

  cgc-evaluate --model=cgc_runs/cluttered_digits
  cgc-evaluate --model=runs/cgc --compare=runs/baseline --max_images=500

Writes metrics.json and grid.png to --output_dir (with --compare also
comparison.json, and prints the comparison table). Dataset flags default to the
model_dir's config.json; the image size to the model's input size.
"""

import json
import os

from absl import app
from absl import flags

_MODEL = flags.DEFINE_string(
    "model", None, "A .keras file, a model_dir from cgc-train, or a cgc-export SavedModel."
)
_COMPARE = flags.DEFINE_string("compare", None, "Optional second model, same forms as --model.")
_DATASET = flags.DEFINE_string(
    "dataset", None, "cluttered_digits, cluttered_digits_holdout, a tfds name or folder:/root; default: "
    "config.json's."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data directory; default: config.json's.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "Image side in pixels; default: the model's input size."
)
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate; default: validation/val/test.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per batch, >= 1.", lower_bound=1)
_MAX_IMAGES = flags.DEFINE_integer(
    "max_images", None, "Evaluate at most this many images (>= 1); default: all.", lower_bound=1
)
_AUC_STEPS = flags.DEFINE_integer(
    "auc_steps", 32, "Insertion/deletion steps, >= 1.", lower_bound=1
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the consistency transforms T.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where to write; default: the model_dir, else ./evaluation."
)
_GRID_IMAGES = flags.DEFINE_integer(
    "grid_images", 8, "Images (rows) in grid.png, >= 0 (0: no grid).", lower_bound=0
)
flags.mark_flag_as_required("model")


def _check_path(flag_name, path):
    if path is not None and not os.path.exists(path):
        raise app.UsageError(f"--{flag_name}={path!r} does not exist")


def _display_name(path):
    """A short model name for tables and grids: the model_dir or file name."""
    path = os.path.normpath(path)
    if os.path.basename(path) == "model.keras":
        path = os.path.dirname(path)
    name = os.path.basename(path)
    return name[: -len(".keras")] if name.endswith(".keras") else name


def _write_json(path, value):
    with open(path, "w") as file:
        json.dump(value, file, indent=2, sort_keys=True)
    print(f"wrote {path}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; all options are --flags")
    _check_path("model", _MODEL.value)
    _check_path("compare", _COMPARE.value)
    # Imported after the flag checks: TensorFlow takes seconds to import.
    import cgc_tf
    from cgc_tf import data
    from cgc_tf import evaluation

    config = evaluation.read_model_dir_config(_MODEL.value)
    dataset = _DATASET.value or config.get("dataset")
    if not dataset:
        raise app.UsageError(f"--dataset is required: {_MODEL.value!r} has no config.json")
    data_dir = _DATA_DIR.value or config.get("data_dir")
    paths = [_MODEL.value] + ([_COMPARE.value] if _COMPARE.value else [])
    names = [_display_name(path) for path in paths]
    if len(set(names)) < len(names):
        names = ["model", "compare"]
    try:
        models = {name: evaluation.load_model(path) for name, path in zip(names, paths)}
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    model_size = evaluation.as_explainer(models[names[0]]).image_size
    image_size = _IMAGE_SIZE.value or (model_size[0] if model_size else config.get("image_size"))
    if not image_size:
        raise app.UsageError("--image_size is required: the model does not record its size")
    if model_size and image_size != model_size[0]:
        raise app.UsageError(
            f"--image_size={image_size} but the model takes {model_size[0]}x{model_size[1]} images"
        )
    output_dir = _OUTPUT_DIR.value or (
        _MODEL.value if os.path.isdir(_MODEL.value) else "evaluation"
    )
    os.makedirs(output_dir, exist_ok=True)
    try:
        info = data.dataset_info(dataset, data_dir, image_size)
    except ValueError as error:
        raise app.UsageError(f"--dataset={dataset!r}: {error}") from error

    def eval_dataset():
        return data.eval_dataset(
            dataset, _BATCH_SIZE.value, image_size, data_dir=data_dir, split=_SPLIT.value,
            with_boxes=info.has_bounding_boxes,
        )

    print(f"cgc-tf {cgc_tf.__version__}: evaluating {_MODEL.value} on {dataset} "
          f"({_SPLIT.value or info.eval_split}, {image_size}x{image_size}, seed {_SEED.value})")
    settings = dict(
        augmentation_seed=_SEED.value, auc_steps=_AUC_STEPS.value, max_images=_MAX_IMAGES.value
    )
    if _COMPARE.value:
        comparison = evaluation.compare_models(
            models[names[0]], models[names[1]], eval_dataset(), names=names, **settings
        )
        comparison["paths"] = dict(zip(names, paths))
        _write_json(os.path.join(output_dir, "comparison.json"), comparison)
        results = comparison["models"][names[0]]
        print(evaluation.comparison_table(comparison))
    else:
        results = evaluation.evaluate_model(models[names[0]], eval_dataset(), **settings)
        print("\n".join(f"{key:<32}{value}" for key, value in results.items()))
    _write_json(os.path.join(output_dir, "metrics.json"), results)
    if _GRID_IMAGES.value:
        images, labels, boxes = evaluation.take_images(eval_dataset(), _GRID_IMAGES.value)
        path = evaluation.save_grid(
            os.path.join(output_dir, "grid.png"), models, images, labels, _SEED.value, boxes=boxes
        )
        print(f"wrote {path}")


def run():
    """Console-script entry point (cgc-evaluate)."""
    app.run(main)


if __name__ == "__main__":
    run()
