"""cgc-tf: Contrastive Grad-CAM Consistency (CVPR 2022) for Keras 3 / TensorFlow.

Public API:
  CGCModel                  keras.Model whose train_step adds the CGC loss.
  PairedAugmentation        one random geometric T for images and heatmaps.
  resample                  T's kernels: crop/flip/resize and projective warps (XLA).
  backbones                 offline ResNet builders with their target layers.
  explain                   Grad-CAM / Grad-CAM++ heatmaps of any Keras classifier.
  gradcam, losses           Grad-CAM by GradientTape; InfoNCE / MSE consistency.
  metrics                   explanation metrics on tensors (sanity, ROAD, sparseness, ...).
  CoupledSGD, optimizers    torch.optim.SGD's update (coupled L2 weight decay).

Imports are lazy: config, console, model_dir, run_lock and evaluation_progress need no
TensorFlow. The names above are imported together on first use, registering cgc_tf's Keras
serializables; `import cgc_tf` does so at once if Keras is already imported, as does
`model_dir.load_model`. Importing any other submodule imports Keras quietly first.
"""

import importlib
import os
import sys

__version__ = "0.1.0"

# Keras reads KERAS_BACKEND at import; cgc-tf is written against tf.GradientTape.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from cgc_tf import console  # noqa: E402 (standard library only)

# Submodules that import neither Keras nor TensorFlow.
_WITHOUT_TENSORFLOW = frozenset({"config", "console", "evaluation_progress", "model_dir", "run_lock"})
# The public names: each one's submodule (a submodule's own name: the submodule).
_SOURCES = {
    "CGCModel": "model",
    "CoupledSGD": "optimizers",
    "PairedAugmentation": "augment",
    "augment": "augment",
    "backbones": "backbones",
    "distribute": "distribute",
    "explain": "explainers",
    "explainers": "explainers",
    "gradcam": "gradcam",
    "losses": "losses",
    "metrics": "metrics",
    "optimizers": "optimizers",
    "resample": "resample",
    "schedules": "schedules",
}

__all__ = [
    "CGCModel",
    "CoupledSGD",
    "PairedAugmentation",
    "augment",
    "backbones",
    "distribute",
    "explain",
    "explainers",
    "gradcam",
    "losses",
    "metrics",
    "optimizers",
    "resample",
    "schedules",
    "__version__",
]


def _import_keras():
    """Imports Keras without TensorFlow's C++ start-up notices; checks its backend."""
    if "keras" not in sys.modules:
        # TensorFlow's import prints C++ start-up notices that TF_CPP_MIN_LOG_LEVEL cannot hide.
        with console.quiet_stderr():
            import keras  # noqa: F401
    backend = sys.modules["keras"].backend.backend()
    if backend != "tensorflow":
        raise ImportError(
            f"cgc_tf needs the TensorFlow Keras backend, but KERAS_BACKEND is {backend!r}; "
            "set KERAS_BACKEND=tensorflow before importing keras"
        )


def _import_public_modules():
    """Imports the submodules of `__all__`, registering cgc_tf's Keras serializables."""
    _import_keras()
    for module in sorted(set(_SOURCES.values())):
        importlib.import_module(f"{__name__}.{module}")


class _KerasFirst:
    """A meta path finder that imports Keras quietly before a cgc_tf submodule needing it.

    It finds nothing itself. Only Keras is imported here (never a cgc_tf module,
    which the import in progress might be).
    """

    @staticmethod
    def find_spec(name, path=None, target=None):
        package, _, rest = name.partition(".")
        if package == __name__ and rest.split(".")[0] not in _WITHOUT_TENSORFLOW:
            _import_keras()
        return None


if not any(finder is _KerasFirst for finder in sys.meta_path):
    sys.meta_path.insert(0, _KerasFirst)

if "keras" in sys.modules:
    # Keras is here already: register the serializables now, as a direct
    # keras.saving.load_model of a cgc_tf model needs them.
    _import_public_modules()


def __getattr__(name):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _import_public_modules()
    value = sys.modules[f"{__name__}.{_SOURCES[name]}"]
    if name != _SOURCES[name]:
        value = getattr(value, name)
    globals()[name] = value  # Later look-ups skip this function.
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
