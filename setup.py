"""cgc-tf: Contrastive Grad-CAM Consistency for Keras 3 / TensorFlow."""

import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(
    r'__version__ = "([^"]+)"', Path(__file__).with_name("cgc_tf").joinpath("__init__.py").read_text()
).group(1)

setup(
    name="cgc-tf",
    version=VERSION,
    description="Contrastive Grad-CAM Consistency (CVPR 2022) for Keras 3 / TensorFlow",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The thin absl binaries live in train/, export/, evaluate/ and prepare/; they are
    # installed under cgc_tf_* names so no generic top-level package lands in
    # site-packages.
    packages=find_packages(include=["cgc_tf", "cgc_tf.*"])
    + ["cgc_tf_train", "cgc_tf_export", "cgc_tf_evaluate", "cgc_tf_prepare"],
    package_dir={
        "cgc_tf_train": "train",
        "cgc_tf_export": "export",
        "cgc_tf_evaluate": "evaluate",
        "cgc_tf_prepare": "prepare",
    },
    package_data={
        "cgc_tf": ["data/cluttered_digits/*.md", "data/elpv/*.md"],
        "cgc_tf_train": ["configs/*.cfg"],
    },
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "keras>=3.3,<3.16",
        "keras-cv>=0.9,<0.10",
        "tensorflow-datasets>=4.9.6,<4.10",
        "absl-py>=2.0,<3",
        "onnx>=1.16,<1.24",
        "tf2onnx>=1.16,<1.18",
        # Export verifies the ONNX model it writes, so the runtime is a core dependency.
        "onnxruntime>=1.18,<1.33",
        "numpy>=1.26",
        "scikit-learn>=1.3",
        "pillow>=10",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "scipy>=1.10"],
        "and-cuda": ["tensorflow[and-cuda]>=2.16,<2.22"],
        # The elpv solar-cell images (about 90 MB; data licence CC BY-NC-SA 4.0,
        # so never a core dependency): --dataset=elpv needs it.
        "elpv": ["elpv-dataset>=1.0,<2"],
        # Parity tests against the reference PyTorch code (tests/reference_*_parity_test.py,
        # skipped without them): torch, and OpenCV for TorchRay's cv2.resize.
        "parity": ["torch>=2", "opencv-python-headless>=4"],
        # benchmarks/explain_throughput.py times cgc_tf.explain against tf-keras-vis.
        "benchmark": ["tf-keras-vis>=0.8.7"],
    },
    entry_points={
        "console_scripts": [
            "cgc-train=cgc_tf_train.main:run",
            "cgc-evaluate=cgc_tf_evaluate.main:run",
            "cgc-export=cgc_tf_export.main:run",
            "cgc-prepare=cgc_tf_prepare.main:run",
        ]
    },
)
