"""cgc-evaluate: accuracy and explanation metrics of a trained model, and a PNG grid.

  cgc-evaluate --model_dir=cgc_runs/cluttered_digits   # what cgc-train --model_dir wrote
  cgc-evaluate --model=runs/cgc --compare=runs/baseline --max_images=500
  cgc-evaluate --model=runs/cgc --protocol=paper
  cgc-evaluate --model=runs/imagenet --protocol=paper --annotated_folder=/data/val_flat

Writes metrics.json and grid.png to --output_dir (with --compare also
comparison.json, and prints the comparison table). Dataset flags default to the
model_dir's config.json; the image size to the model's input size.
--protocol=cgc_tf (default) is cgc_tf.evaluation's protocol; --protocol=paper is
the reference code's (cgc_tf.paper_protocol), written to metrics.json in
<model_dir>/paper_protocol by default. docs/evaluation.md compares them.
"""

import os
import sys

# Before TensorFlow is imported: hide its C++ INFO and WARNING lines unless asked for.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

try:  # installed: the binaries are packages cgc_tf_train, cgc_tf_evaluate, ...
    from cgc_tf_train import config_flags  # noqa: E402
except ModuleNotFoundError:  # a checkout on sys.path (Bazel's py_binary, python -m evaluate.main)
    from train import config_flags  # noqa: E402

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "A cgc-train --model_dir (holds model.keras and config.json); or --model."
)
_MODEL = flags.DEFINE_string(
    "model", None, "A .keras file, a model_dir from cgc-train, or a cgc-export SavedModel."
)
_COMPARE = flags.DEFINE_string("compare", None, "Optional second model, same forms as --model.")
# The flags cgc-train also has: TrainConfig's names, types and help texts (the
# unset ones take the model_dir's config.json or the model's input size).
_SHARED = config_flags.define_config_flags(
    ["dataset", "data_dir", "image_size", "batch_size", "seed", "transform_min_area"],
    defaults={"dataset": None, "data_dir": None, "image_size": None, "transform_min_area": None},
    notes={
        "dataset": "Default: config.json's.",
        "data_dir": "Default: config.json's.",
        "image_size": "Default: the model's input size.",
        "seed": "Here: the seed of the consistency transforms T.",
        "transform_min_area": "Consistency is also reported for T with crop areas in [this, 1]; "
        "default: config.json's transform_min_area (the training T).",
    },
)
flags.adopt_module_key_flags(config_flags)
flags.register_validator("batch_size", lambda size: size >= 1, "--batch_size must be >= 1")
_DATASET, _DATA_DIR, _IMAGE_SIZE, _BATCH_SIZE, _SEED, _TRANSFORM_MIN_AREA = _SHARED.values()
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate; default: validation/val/test.")
_MAX_IMAGES = flags.DEFINE_integer(
    "max_images", None, "Evaluate at most this many images (>= 1); default: all.", lower_bound=1
)
_AUC_STEPS = flags.DEFINE_integer(
    "auc_steps", 32, "Insertion/deletion steps, >= 1.", lower_bound=1
)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where to write; default: the model_dir, else ./evaluation."
)
_PROTOCOL = flags.DEFINE_enum(
    "protocol", "cgc_tf", ["cgc_tf", "paper"],
    "cgc_tf: centre-cropped views (cgc_tf.evaluation); paper: the reference's Content Heatmap "
    "and RISE insertion/deletion on full images (docs/evaluation.md).",
)
_INPUT_RESIZE = flags.DEFINE_integer(
    "input_resize", None, "Paper protocol: short side (pixels) of the Content Heatmap input; "
    "default 448, the digits' canvas size for cluttered_digits.", lower_bound=1,
)
_ANNOTATED_FOLDER = flags.DEFINE_string(
    "annotated_folder", None, "Paper protocol: a folder with val/*.JPEG and annotation/*.xml "
    "(Pascal-VOC boxes); default: the dataset's own boxes (tfds).",
)
_CLASS_NAMES = flags.DEFINE_string(
    "class_names", None, "Paper protocol with --annotated_folder: a text file, one class name "
    "(e.g. synset) per line in label order; default: the dataset's class names.",
)
_GRID_IMAGES = flags.DEFINE_integer(
    "grid_images", 8, "Images (rows) in grid.png, >= 0 (0: no grid).", lower_bound=0
)
_QUALITY_IMAGES = flags.DEFINE_integer(
    "quality_images", 32, "Images (the first of the split) for sparseness, max-sensitivity, "
    "ROAD, the randomisation sanity check and curves.png, >= 0 (0: none).", lower_bound=0
)
flags.mark_flags_as_mutual_exclusive(["model", "model_dir"], required=True)


def _training_augmentation(min_area):
    import cgc_tf

    return cgc_tf.PairedAugmentation(area_range=(float(min_area), 1.0))


def _add_training_consistency(results, extra, min_area):
    """Labels the default consistency (paper T) and adds the one at the training T."""
    from cgc_tf import paper_protocol

    results["consistency_transform_area"] = list(paper_protocol.PAPER_TRANSFORM_AREA)
    results["consistency_cosine_training_transforms"] = extra["consistency_cosine"]
    results["consistency_pearson_training_transforms"] = extra["consistency_pearson"]
    results["training_transform_area"] = [float(min_area), 1.0]


def _check_path(flag_name, path):
    if path is not None and not os.path.exists(path):
        raise app.UsageError(f"--{flag_name}={path!r} does not exist")


def _display_name(path):
    """A short model name for tables and grids: the model_dir or file name."""
    from cgc_tf import model_dir

    path = os.path.normpath(path)
    if os.path.basename(path) == model_dir.MODEL_FILE:
        path = os.path.dirname(path)
    name = os.path.basename(path)
    return name[: -len(".keras")] if name.endswith(".keras") else name


def _write_json(path, value):
    from cgc_tf import model_dir

    model_dir.write_json(path, value)
    print(f"wrote {path}")


def _paper_examples(dataset, data_dir, image_size):
    """Example dicts of the paper protocol: --annotated_folder or the dataset's boxes."""
    from cgc_tf import data
    from cgc_tf.data import annotated

    if _ANNOTATED_FOLDER.value is None:
        return annotated.tfds_examples(dataset, data_dir, image_size, _SPLIT.value)
    if _CLASS_NAMES.value:
        with open(_CLASS_NAMES.value) as file:
            class_names = [line.strip() for line in file if line.strip()]
    else:
        class_names = data.dataset_info(dataset, data_dir, image_size).class_names
    return annotated.voc_folder_examples(_ANNOTATED_FOLDER.value, class_names)


def _add_quality(results, models, dataset, output_dir):
    """Adds cgc_tf.explanation_quality's metrics of the first model; writes curves.png."""
    from cgc_tf import evaluation
    from cgc_tf import explanation_quality

    count = min(_QUALITY_IMAGES.value, _MAX_IMAGES.value or _QUALITY_IMAGES.value)
    images, labels, _ = evaluation.take_images(dataset, count)
    explainers = {name: evaluation.as_explainer(model) for name, model in models.items()}
    quality = explanation_quality.explanation_quality(
        next(iter(explainers.values())), images, labels, seed=_SEED.value
    )
    print("\n".join(f"{key:<40}{value}" for key, value in quality.items()))
    results.update(quality)
    path = explanation_quality.save_insertion_deletion_curves(
        os.path.join(output_dir, "curves.png"), explainers, images, labels, _AUC_STEPS.value
    )
    print(f"wrote {path}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; all options are --flags")
    _check_path("model", _MODEL.value)
    _check_path("model_dir", _MODEL_DIR.value)
    model_path = _MODEL_DIR.value or _MODEL.value
    _check_path("compare", _COMPARE.value)
    _check_path("annotated_folder", _ANNOTATED_FOLDER.value)
    _check_path("class_names", _CLASS_NAMES.value)
    paper = _PROTOCOL.value == "paper"
    if paper and _COMPARE.value:
        raise app.UsageError("--compare needs --protocol=cgc_tf; evaluate each model with paper")
    if _TRANSFORM_MIN_AREA.value is not None and not 0 < _TRANSFORM_MIN_AREA.value <= 1:
        raise app.UsageError(f"--transform_min_area={_TRANSFORM_MIN_AREA.value} must be in (0, 1]")
    # Imported after the flag checks: TensorFlow came with the flags (cgc_tf.config),
    # the data and evaluation modules add tensorflow-datasets.
    import cgc_tf
    from cgc_tf import data
    from cgc_tf import config as config_lib
    from cgc_tf import evaluation
    from cgc_tf import model_dir as layout
    from cgc_tf import paper_protocol

    from cgc_tf import console

    console.setup(verbose=flags.FLAGS["verbosity"].present)
    config = layout.read_config(model_path)
    dataset = _DATASET.value or config.get("dataset")
    if not dataset:
        raise app.UsageError(f"--dataset is required: {model_path!r} has no config.json")
    data_dir = _DATA_DIR.value or config.get("data_dir")
    paths = [model_path] + ([_COMPARE.value] if _COMPARE.value else [])
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
        model_path if os.path.isdir(model_path) else "evaluation"
    )
    if paper and not _OUTPUT_DIR.value:  # never overwrite the training's metrics.json
        output_dir = os.path.join(output_dir, layout.PAPER_PROTOCOL_DIR)
    min_area = _TRANSFORM_MIN_AREA.value or config.get("transform_min_area")
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

    print(f"cgc-tf {cgc_tf.__version__}: evaluating {model_path} on {dataset} "
          f"({_SPLIT.value or info.eval_split}, {image_size}x{image_size}, seed {_SEED.value}, "
          f"protocol {_PROTOCOL.value})")
    if paper:
        digits = dataset in (config_lib.EMBEDDED_DATASET, config_lib.HOLDOUT_DATASET)
        default_resize = image_size if digits else paper_protocol.INPUT_RESIZE
        input_resize = _INPUT_RESIZE.value or default_resize
        try:
            results = paper_protocol.evaluate_paper(
                models[names[0]], _paper_examples(dataset, data_dir, image_size),
                input_resize=input_resize, transform_min_area=min_area, seed=_SEED.value,
                batch_size=_BATCH_SIZE.value, max_images=_MAX_IMAGES.value,
            )
        except ValueError as error:
            raise app.UsageError(str(error)) from error
        print("\n".join(f"{key:<40}{value}" for key, value in results.items()))
        _write_json(os.path.join(output_dir, layout.METRICS_FILE), results)
        return
    settings = dict(
        augmentation_seed=_SEED.value, auc_steps=_AUC_STEPS.value, max_images=_MAX_IMAGES.value,
        # The split's size, for the progress lines' totals.
        dataset_size=info.splits.get(_SPLIT.value or info.eval_split) or None,
    )
    if _COMPARE.value:
        comparison = evaluation.compare_models(
            models[names[0]], models[names[1]], eval_dataset(), names=names, **settings
        )
        comparison["paths"] = dict(zip(names, paths))
        comparison["protocol"] = evaluation.PROTOCOL
        if min_area is not None:
            extra = evaluation.evaluate_consistency(
                models, eval_dataset(), _training_augmentation(min_area), _SEED.value,
                _MAX_IMAGES.value, dataset_size=settings["dataset_size"],
            )
            for name in names:
                _add_training_consistency(comparison["models"][name], extra[name], min_area)
        _write_json(os.path.join(output_dir, "comparison.json"), comparison)
        results = comparison["models"][names[0]]
        print(evaluation.comparison_table(comparison))
    else:
        results = evaluation.evaluate_model(models[names[0]], eval_dataset(), **settings)
        if min_area is not None:
            extra = evaluation.evaluate_consistency(
                models, eval_dataset(), _training_augmentation(min_area), _SEED.value,
                _MAX_IMAGES.value, dataset_size=settings["dataset_size"],
            )
            _add_training_consistency(results, extra[names[0]], min_area)
        print("\n".join(f"{key:<40}{value}" for key, value in results.items()))
    consistency_area = list(paper_protocol.PAPER_TRANSFORM_AREA)
    results = {"protocol": evaluation.PROTOCOL, "consistency_transform_area": consistency_area,
               **results}
    if _QUALITY_IMAGES.value:
        _add_quality(results, models, eval_dataset(), output_dir)
    _write_json(os.path.join(output_dir, layout.METRICS_FILE), results)
    if _GRID_IMAGES.value:
        images, labels, boxes = evaluation.take_images(eval_dataset(), _GRID_IMAGES.value)
        path = evaluation.save_grid(
            os.path.join(output_dir, "grid.png"), models, images, labels, _SEED.value, boxes=boxes
        )
        print(f"wrote {path}")


def run():
    """Console-script entry point (cgc-evaluate)."""
    from cgc_tf import console

    console.prepare_binary(flags.FLAGS, sys.modules[__name__])
    app.run(main)


if __name__ == "__main__":
    run()
