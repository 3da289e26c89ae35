"""The paper protocol against the reference's own evaluation code (torch, cv2).

The reference files in ../shared/reference-cgc are executed, never copied:
TorchRay's `validate_multi` / `compute_gradcam` / `imagenet_as_mask` and its
`ImageNetDetection` XML parser run on a generated VOC folder with given
heatmaps; RISE's `CausalMetric.evaluate`, `gkern` and `auc` run on the same
images, saliency and scoring function as `cgc_tf.paper_protocol.rise_curves`.
Functions are taken from the reference files' syntax trees (their modules import
CUDA-only or absent packages at import time) and executed with `.cuda()` made a
no-op. Skipped without torch, cv2 or the reference folder.
"""

import ast
import importlib.util
import os
import sys
import tempfile
import types
import xml.etree.ElementTree as ElementTree

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cgc_tf import backbones
from cgc_tf import gradcam
from cgc_tf import paper_protocol
from cgc_tf.data import annotated

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

REFERENCE_DIR = os.environ.get(
    "CGC_REFERENCE_DIR",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "reference-cgc"),
)
TORCHRAY_DIR = os.path.join(REFERENCE_DIR, "TorchRay", "torchray", "benchmark")
RISE_DIR = os.path.join(REFERENCE_DIR, "RISE")
if not os.path.isdir(TORCHRAY_DIR) or not os.path.isdir(RISE_DIR):
    pytest.skip(f"reference code not found at {REFERENCE_DIR}", allow_module_level=True)

CLASS_NAMES = ["n001", "n002", "n003"]
MEAN = np.asarray(backbones.IMAGENET_MEAN, np.float32)
STD = np.asarray(backbones.IMAGENET_STD, np.float32)


def _definitions(path, names, namespace):
    """Executes the top-level definitions `names` of a reference file in `namespace`."""
    with open(path) as file:
        tree = ast.parse(file.read(), filename=path)
    wanted = [node for node in tree.body if getattr(node, "name", None) in names]
    found = {node.name for node in wanted}
    assert found == set(names), f"{path} lacks {set(names) - found}"
    exec(compile(ast.Module(body=wanted, type_ignores=[]), path, "exec"), namespace)
    return namespace


class _NoCuda:
    """Makes `Tensor.cuda()` return the tensor itself (the reference calls it everywhere)."""

    def __enter__(self):
        self._cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
        return self

    def __exit__(self, *exc):
        torch.Tensor.cuda = self._cuda


def _write_folder(root, images):
    """Writes root/val/<name>.JPEG and root/annotation/<name>.xml for (name, w, h, objects)."""
    os.makedirs(os.path.join(root, "val"))
    os.makedirs(os.path.join(root, "annotation"))
    rng = np.random.default_rng(0)
    for name, width, height, objects in images:
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, "val", name + ".JPEG"))
        parts = [f"<annotation><filename>{name}</filename><size><width>{width}</width>"
                 f"<height>{height}</height><depth>3</depth></size>"]
        for object_name, xmin, ymin, xmax, ymax in objects:
            parts.append(f"<object><name>{object_name}</name><bndbox><xmin>{xmin}</xmin>"
                         f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>"
                         "</object>")
        parts.append("</annotation>")
        with open(os.path.join(root, "annotation", name + ".xml"), "w") as file:
            file.write("".join(parts))


class _VisionDataset:
    """torchvision's VisionDataset as far as ImageNetDetection uses it."""

    def __init__(self, root, transforms, transform, target_transform):
        del transforms, target_transform
        self.root, self.transform = root, transform


class _GivenHeatmapModel(torch.nn.Module):
    """Returns (logits, features) whose TorchRay Grad-CAM is the next given heatmap.

    features = heatmap [1, 1, h, w]; every logit is their sum, so d logit / d
    features = 1 and TorchRay's gradient x activation CAM is the heatmap itself.
    """

    def __init__(self, heatmaps, num_classes):
        super().__init__()
        self._heatmaps = list(heatmaps)
        self._num_classes = num_classes

    def forward(self, images, vanilla_with_feats=False):
        del images
        assert vanilla_with_feats
        features = torch.tensor(self._heatmaps.pop(0), dtype=torch.float32)[None, None]
        features.requires_grad_(True)
        logits = features.sum(dim=[2, 3]).repeat(1, self._num_classes)
        return logits, features


def _torchray_content_heatmap(root, model, transform=None):
    """(per-image values, mean percent) of TorchRay's validate_multi on `root`.

    `transform` maps a PIL image to a tensor [3, H, W] (default: pixels / 255).
    """
    namespace = {
        "torch": torch, "np": np, "nn": torch.nn, "cv2": cv2, "time": __import__("time"),
    }
    evaluate_file = os.path.join(TORCHRAY_DIR, "evaluate_imagenet_gradcam_energy_inside_bbox.py")
    _definitions(evaluate_file, ["validate_multi", "compute_gradcam", "unwrap_dict",
                                 "AverageMeter"], namespace)
    datasets = {
        "torch": torch, "os": os, "version": __import__("packaging.version").version,
        "ET": ElementTree, "collections": __import__("collections"), "Image": Image,
        "_IMAGENET_CLASS_TO_INDEX": {name: i for i, name in enumerate(CLASS_NAMES)},
        "torchvision": types.SimpleNamespace(
            datasets=types.SimpleNamespace(VisionDataset=_VisionDataset)
        ),
    }
    _definitions(os.path.join(TORCHRAY_DIR, "datasets.py"),
                 ["imagenet_as_mask", "annotation_as_image_size", "ImageNetDetection"], datasets)
    namespace["pointing_datasets"] = types.SimpleNamespace(**datasets)

    class RecordingMeter(namespace["AverageMeter"]):
        def __init__(self):
            super().__init__()
            self.values = []
            meters.append(self)

        def update(self, val, n=1):
            self.values.append(float(val))
            super().update(val, n)

    meters = []
    namespace["AverageMeter"] = RecordingMeter

    def to_tensor(image):
        return torch.from_numpy(np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0)

    dataset = datasets["ImageNetDetection"](root, transform=transform or to_tensor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)
    with _NoCuda():
        namespace["validate_multi"](loader, dataset, model)
    # validate_multi's meters: batch_time, then heatmap_inside_bbox.
    return meters[1].values, meters[1].avg * 100.0


class TorchRayContentHeatmapParityTest(tf.test.TestCase):

    def test_content_heatmap_equals_torchray(self):
        images = [
            # Two boxes of the label n002 (the first object) and one of n001, ignored.
            ("a", 40, 30, [("n002", 3, 4, 10, 12), ("n001", 1, 1, 40, 30),
                           ("n002", 15, 14, 22, 20)]),
            # Portrait, a box touching the right and bottom borders.
            ("b", 24, 36, [("n001", 5, 9, 24, 36)]),
            # An all-zero Grad-CAM: uniform map, the box's area fraction.
            ("c", 33, 21, [("n003", 2, 2, 11, 7)]),
            # Box coordinates beyond the image are clipped by both.
            ("d", 17, 19, [("n003", 4, 6, 30, 40), ("n003", 1, 1, 2, 2)]),
        ]
        rng = np.random.default_rng(1)
        heatmaps = [
            rng.uniform(0, 1, size=(4, 5)).astype(np.float32),
            np.maximum(rng.normal(size=(6, 3)), 0).astype(np.float32),
            np.zeros((3, 4), np.float32),
            rng.uniform(0, 1, size=(2, 2)).astype(np.float32) ** 3,
        ]
        with tempfile.TemporaryDirectory() as root:
            _write_folder(root, images)
            reference_values, reference_mean = _torchray_content_heatmap(
                root, _GivenHeatmapModel(heatmaps, len(CLASS_NAMES))
            )
            ours = []
            for example, heatmap in zip(annotated.voc_folder_examples(root, CLASS_NAMES), heatmaps):
                gt = example["boxes"][example["box_labels"] == example["label"]]
                percent, _ = paper_protocol.content_heatmap(
                    heatmap[None], gt[None], example["image"].shape[:2]
                )
                ours.append(float(percent[0]))
        self.assertLen(reference_values, len(images))
        self.assertAllClose(ours, [100.0 * v for v in reference_values], atol=1e-4, rtol=1e-5)
        self.assertAllClose(np.mean(ours), reference_mean, atol=1e-4)
        # Image c scores its box's area fraction (10 x 6 of 33 x 21 pixels).
        self.assertAllClose(ours[2], 100.0 * 60 / (33 * 21), atol=1e-4)

    def test_both_torchray_gradcams_equal_ours_for_a_pooling_dense_head(self):
        # The ImageNet file multiplies gradient and activation per position, the
        # fine-grained file pools the gradient first: equal for pooling + dense.
        rng = np.random.default_rng(2)
        features = rng.normal(size=(2, 6, 4, 5)).astype(np.float32)  # torch NCHW
        kernel = rng.normal(size=(6, 3)).astype(np.float32)
        targets = torch.tensor([2, 0])
        maps = []
        for name in ("imagenet", "finegrained"):
            namespace = {"torch": torch, "np": np, "nn": torch.nn}
            path = os.path.join(TORCHRAY_DIR, f"evaluate_{name}_gradcam_energy_inside_bbox.py")
            _definitions(path, ["compute_gradcam"], namespace)
            feats = torch.tensor(features, requires_grad=True)
            output = feats.mean(dim=[2, 3]) @ torch.tensor(kernel)
            with _NoCuda():
                maps.append(namespace["compute_gradcam"](output, feats, targets).detach().numpy())
        ours = gradcam.sum_normalize(gradcam.closed_form_cam(
            features.transpose(0, 2, 3, 1), kernel, targets.numpy()
        ))
        self.assertAllClose(maps[0], maps[1], atol=1e-6)
        self.assertAllClose(ours, maps[0], atol=1e-6)

    def test_evaluate_paper_equals_torchray_with_an_identical_model(self):
        # One conv + pooling + dense network in both frameworks, same weights; the
        # reference's transform: Resize(short side), ToTensor, ImageNet Normalize.
        keras.utils.set_random_seed(4)
        inputs = keras.Input((16, 16, 3))
        x = keras.layers.Normalization(
            mean=list(MEAN), variance=list(STD**2), name="imagenet_normalization"
        )(inputs)
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="features")(x)
        logits = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
        ours = keras.Model(inputs, logits)
        conv, dense = ours.get_layer("features"), ours.layers[-1]
        torch_conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        torch_dense = torch.nn.Linear(4, 3)
        with torch.no_grad():
            torch_conv.weight.copy_(torch.tensor(conv.kernel.numpy().transpose(3, 2, 0, 1)))
            torch_conv.bias.copy_(torch.tensor(conv.bias.numpy()))
            torch_dense.weight.copy_(torch.tensor(dense.kernel.numpy().T))
            torch_dense.bias.copy_(torch.tensor(dense.bias.numpy()))

        class TorchModel(torch.nn.Module):
            def forward(self, images, vanilla_with_feats=False):
                features = torch.relu(torch_conv(images))
                return torch_dense(features.mean(dim=[2, 3])), features

        input_resize = 24

        def transform(image):  # torchvision's Resize(int) on PIL images, then normalise
            height, width = image.height, image.width
            size = paper_protocol.short_side_size(height, width, input_resize)
            pixels = np.asarray(image.resize(size[::-1], Image.BILINEAR), np.float32) / 255
            return torch.from_numpy(((pixels - MEAN) / STD).transpose(2, 0, 1).copy())

        images = [
            ("a", 40, 30, [("n002", 3, 4, 25, 22), ("n001", 1, 1, 40, 30),
                           ("n002", 28, 14, 37, 27)]),
            ("b", 30, 45, [("n001", 5, 9, 24, 36)]),
            ("c", 33, 21, [("n003", 2, 2, 20, 17)]),
        ]
        with tempfile.TemporaryDirectory() as root:
            _write_folder(root, images)
            reference_values, reference_mean = _torchray_content_heatmap(
                root, TorchModel(), transform
            )
            result = paper_protocol.evaluate_paper(
                ours, list(annotated.voc_folder_examples(root, CLASS_NAMES)),
                input_resize=input_resize, progress=False,
            )
        self.assertEqual(result["num_images"], len(reference_values))
        self.assertAllClose(result["content_heatmap_percent"], reference_mean, atol=1e-4)


def _rise_module():
    """RISE/evaluation.py imported with a stand-in for its plotting `utils`."""
    utils = types.ModuleType("utils")
    utils.np, utils.torch, utils.plt = np, torch, None
    previous = sys.modules.get("utils")
    sys.modules["utils"] = utils
    try:
        spec = importlib.util.spec_from_file_location(
            "rise_evaluation", os.path.join(RISE_DIR, "evaluation.py")
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del sys.modules["utils"]
        else:
            sys.modules["utils"] = previous
    return module


def _rise_blur(rise):
    """The insertion substrate as evaluate_auc_metrics.py builds it (its own statements)."""
    path = os.path.join(RISE_DIR, "evaluate_auc_metrics.py")
    with open(path) as file:
        tree = ast.parse(file.read())
    function = next(n for n in tree.body if getattr(n, "name", "") == "get_auc_per_data_subset")
    statements = [
        node for node in function.body
        if isinstance(node, ast.Assign) and node.targets[0].id in ("klen", "ksig", "kern", "blur")
    ]
    namespace = {"gkern": rise.gkern, "F": torch.nn.functional}
    exec(compile(ast.Module(body=statements, type_ignores=[]), path, "exec"), namespace)
    return namespace


class _Scorer:
    """One tiny Keras classifier seen by both: ours takes [0, 1] NHWC, RISE's normalised NCHW."""

    def __init__(self, num_classes):
        keras.utils.set_random_seed(3)
        inputs = keras.Input((None, None, 3))
        x = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        self.model = keras.Model(inputs, keras.layers.Dense(num_classes)(x) * 4.0)

    def logits(self, images):
        return self.model(images)

    def torch_probabilities(self, normalised):
        images = normalised.numpy().transpose(0, 2, 3, 1) * STD + MEAN
        return torch.from_numpy(tf.nn.softmax(self.model(images)).numpy())


class RiseParityTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.rise = _rise_module()

    def test_blur_kernel_is_gkern(self):
        namespace = _rise_blur(self.rise)
        self.assertEqual((namespace["klen"], namespace["ksig"]),
                         (paper_protocol.BLUR_KERNEL_SIZE, paper_protocol.BLUR_SIGMA))
        self.assertAllClose(paper_protocol.rise_blur_kernel(), namespace["kern"][0, 0].numpy(),
                            atol=1e-8)

    def _curves(self, mode, size, pixels_per_step, batch_size):
        rng = np.random.default_rng(5)
        images = rng.integers(0, 256, size=(batch_size, size, size, 3)).astype(np.float32) / 255
        saliency = rng.uniform(size=(batch_size, size, size)).astype(np.float32)  # no ties
        scorer = _Scorer(num_classes=4)
        self.rise.HW, self.rise.n_classes = size * size, 4
        substrate = _rise_blur(self.rise)["blur"] if mode == "ins" else torch.zeros_like
        metric = self.rise.CausalMetric(
            scorer.torch_probabilities, mode, pixels_per_step, substrate
        )
        normalised = torch.from_numpy(((images - MEAN) / STD).transpose(0, 3, 1, 2).copy())
        with _NoCuda():
            reference = metric.evaluate(normalised, saliency, batch_size=3)  # [steps + 1, B]
        insertion, deletion, _ = paper_protocol.rise_curves(
            scorer.logits, images, saliency, pixels_per_step
        )
        return reference.T, (insertion if mode == "ins" else deletion).numpy()

    def test_insertion_and_deletion_equal_causal_metric(self):
        for mode in ("ins", "del"):
            # 16x16 = 256 pixels, 20 per step: 13 steps, the last one partial.
            reference, ours = self._curves(mode, size=16, pixels_per_step=20, batch_size=4)
            self.assertEqual(ours.shape, (4, 14))
            self.assertAllClose(ours, reference, atol=1e-5)
            self.assertAllClose(np.mean(paper_protocol.rise_auc(ours)),
                                self.rise.auc(reference.mean(0)), atol=1e-6)

    def test_default_steps_at_224_are_rises(self):
        self.assertEqual(paper_protocol.default_pixels_per_step(224, 224), 224 * 8)


if __name__ == "__main__":
    tf.test.main()
