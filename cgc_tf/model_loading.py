"""The models an evaluation takes, behind one interface, and how they are loaded.

`Explainer` gives logits and Grad-CAM of a `CGCModel` or any functional Keras
classifier; `SavedModelExplainer` the same of a cgc-export SavedModel, through its
signatures; `load_model` reads any of them from disk (a `.keras` file, a
model_dir, an export folder). `check_batch` gives readable errors for images of
the wrong size and labels out of a model's range. Images are float32
[B, H, W, 3] in [0, 1].
"""

import json
import os

import keras
import tensorflow as tf

from cgc_tf import model_dir as layout
from cgc_tf.model import CGCModel


def as_explainer(model):
    """An `Explainer` for a model, or the model itself if it already is one.

    Args:
      model: `CGCModel`, functional keras classifier, `Explainer` or
        `SavedModelExplainer`.
    """
    if isinstance(model, (Explainer, SavedModelExplainer)):
        return model
    return Explainer(model)


class Explainer:
    """Uniform access to logits and Grad-CAM for a CGCModel or a plain classifier.

    Args:
      model: a `cgc_tf.CGCModel`, or a functional keras classifier (images in
        [0, 1] -> logits), wrapped in a CGCModel with `target_layer`.
      target_layer: Grad-CAM layer of a plain classifier (None:
        `cgc_tf.explainers.auto_target_layer`'s choice);
        must be None for a CGCModel (it has its own).
    """

    def __init__(self, model, target_layer=None):
        if isinstance(model, Explainer):
            model = model.model
        if isinstance(model, CGCModel):
            if target_layer not in (None, model.target_layer):
                raise ValueError(
                    f"target_layer={target_layer!r} given for a CGCModel whose target layer "
                    f"is {model.target_layer!r}; omit target_layer"
                )
        elif isinstance(model, keras.Model):
            model = CGCModel(model, target_layer=target_layer)
        else:
            raise ValueError(
                "`model` must be a cgc_tf.CGCModel or a functional keras.Model classifier; "
                f"received {type(model).__name__}"
            )
        self.model = model
        self.image_size = tuple(model.image_size)
        self.num_classes = int(model.backbone.outputs[0].shape[-1])
        self.logits = tf.function(
            lambda images: model(images, training=False), reduce_retracing=True
        )

    def explain(self, images, class_index=None):
        """`CGCModel.explain`: dict of probabilities, class_id, heatmap."""
        return self.model.explain(images, class_index=class_index)


class SavedModelExplainer:
    """A SavedModel written by `cgc-export`, through its float-input signatures.

    Uses `explain` / `explain_class` for heatmaps and `serving_default` for
    probabilities; `logits` returns log-probabilities, whose softmax is the
    exported probabilities, so the insertion/deletion curves are unchanged.

    Args:
      path: the SavedModel folder (export_dir/<version>).
    """

    REQUIRED_SIGNATURES = ("serving_default", "explain", "explain_class")

    def __init__(self, path):
        loaded = tf.saved_model.load(path)
        missing = [name for name in self.REQUIRED_SIGNATURES if name not in loaded.signatures]
        if missing:
            raise ValueError(
                f"model={path!r} is a SavedModel without the signatures {missing} of "
                f"cgc-export (it has {sorted(loaded.signatures)})"
            )
        self.path = path
        self._loaded = loaded  # keeps the signatures' variables alive
        self._signatures = loaded.signatures
        self.image_size = self.num_classes = None
        if "metadata" in loaded.signatures:
            metadata = json.loads(loaded.signatures["metadata"]()["metadata_json"].numpy())
            size = int(metadata["image_size"])
            self.image_size = (size, size)
            self.num_classes = int(metadata["num_classes"])

    def explain(self, images, class_index=None):
        """dict of probabilities float32 [B, K], class_id int32 [B], heatmap [B, H, W]."""
        images = tf.cast(images, tf.float32)
        if class_index is None:
            return self._signatures["explain"](images=images)
        class_index = tf.cast(class_index, tf.int32)
        return self._signatures["explain_class"](images=images, class_index=class_index)

    def logits(self, images):
        """Log-probabilities float32 [B, K] (floored at 1e-30 to stay finite)."""
        probabilities = self._signatures["serving_default"](images=tf.cast(images, tf.float32))
        return tf.math.log(tf.maximum(probabilities["probabilities"], 1e-30))


def _saved_model_dir(path):
    """`path` or its highest numbered version holding a SavedModel, else None."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = [
        name
        for name in os.listdir(path)
        if name.isdigit() and os.path.isfile(os.path.join(path, name, "saved_model.pb"))
    ]
    if versions:
        return os.path.join(path, max(versions, key=int))
    return None


def load_model(path):
    """Loads a model saved by training, `keras.Model.save` or `cgc-export`.

    Args:
      path: a `.keras` file; a model_dir containing `model.keras`; or a SavedModel
        exported by cgc-export (its version folder, or the export folder, whose
        highest version is used).

    Returns:
      the loaded keras.Model (a CGCModel when training saved it), or a
      `SavedModelExplainer`.

    Raises:
      ValueError: if `path` is none of these.
    """
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, layout.MODEL_FILE)):
        saved_model = _saved_model_dir(path)
        if saved_model is not None:
            return SavedModelExplainer(saved_model)
        found = sorted(os.listdir(path))[:20]
        raise ValueError(
            f"model={path!r} is a directory without {layout.MODEL_FILE} or a SavedModel; pass "
            f"a .keras file, a model_dir written by cgc-train or a cgc-export folder (it "
            f"contains {found})"
        )
    return layout.load_model(path)


def check_batch(images, labels, explainers):
    """Raises a readable ValueError for images of the wrong size or labels out of range.

    Args:
      images: float32 [B, H, W, 3].
      labels: int [B].
      explainers: dict name -> `Explainer` or `SavedModelExplainer`.
    """
    size = tuple(images.shape[1:3])
    low, high = int(tf.reduce_min(labels)), int(tf.reduce_max(labels))
    for name, explainer in explainers.items():
        if explainer.num_classes is not None and (low < 0 or high >= explainer.num_classes):
            raise ValueError(
                f"dataset labels span [{low}, {high}] but model {name!r} has "
                f"{explainer.num_classes} classes; evaluate it on the dataset it was trained on"
            )
        if explainer.image_size is not None and size != explainer.image_size:
            raise ValueError(
                f"model {name!r} takes {explainer.image_size[0]}x{explainer.image_size[1]} "
                f"images but the dataset yields {size[0]}x{size[1]}; set image_size to "
                f"{explainer.image_size[0]}"
            )
