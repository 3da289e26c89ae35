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
"""

import os

__version__ = "0.1.0"

# Keras reads KERAS_BACKEND at import; cgc-tf is written against tf.GradientTape.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from cgc_tf import console  # noqa: E402 (standard library only)

# TensorFlow's import prints C++ start-up notices that TF_CPP_MIN_LOG_LEVEL cannot hide.
with console.quiet_stderr():
    import keras  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"cgc_tf needs the TensorFlow Keras backend, but KERAS_BACKEND is "
        f"{keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow before importing keras"
    )

from cgc_tf import augment  # noqa: E402
from cgc_tf import backbones  # noqa: E402
from cgc_tf import distribute  # noqa: E402
from cgc_tf import explainers  # noqa: E402
from cgc_tf import gradcam  # noqa: E402
from cgc_tf import losses  # noqa: E402
from cgc_tf import metrics  # noqa: E402
from cgc_tf import optimizers  # noqa: E402
from cgc_tf import resample  # noqa: E402
from cgc_tf import schedules  # noqa: E402
from cgc_tf.augment import PairedAugmentation  # noqa: E402
from cgc_tf.explainers import explain  # noqa: E402
from cgc_tf.model import CGCModel  # noqa: E402
from cgc_tf.optimizers import CoupledSGD  # noqa: E402

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
