"""Numerical parity with the reference's own PyTorch code (../shared/reference-cgc).

One CGC training step of ResNet-18 at 224x224, batch 4, both networks in train mode
(BatchNorm batch statistics) with identical weights (ours copied into the reference's
`models/resnet_multigpu_cgc.py` ResNet), the same three views and the same crop/flip
parameters of T. Compared: the three cross-entropy terms, the CGC (InfoNCE, the
reference's NCESoftmaxLoss) and GC (MSE) losses, the Grad-CAM masks before and after
the warp (the reference's `compute_gradcam_mask` / `perform_gradcam_aug`), every
parameter gradient of `xe + lambda * cgc`, the weights after one full step on each
side's own gradients (bounded by the gradient tolerances), and the optimizers alone:
two SGD steps (momentum, coupled weight decay, a learning-rate drop) of our
CoupledSGD and torch.optim.SGD on the same gradients. ResNet-34 and ResNet-50 (v1.5):
logits and layer4 features equal the reference's, in eval and train mode.

Skipped without torch (`pip install -e ".[parity]"`) or without the reference files.
  python -m pytest -q -s tests/reference_parity_test.py   # -s prints the differences
"""

import ast
import importlib
import importlib.machinery
import importlib.util
import pathlib
import sys
from unittest import mock

from absl.testing import parameterized
import keras
import numpy as np
import pytest
import tensorflow as tf

from cgc_tf import augment
from cgc_tf import backbones
from cgc_tf import gradcam as gradcam_lib
from cgc_tf import losses
from cgc_tf import optimizers
from cgc_tf import resample
from cgc_tf.model import CGCModel

REFERENCE_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "reference-cgc"
# A package name of our own, so the reference's `models` cannot clash with another.
REFERENCE_PACKAGE = "cgc_reference_models"

SIZE = 224  # the reference hard-codes 224 in its upsampling and warp
NUM_CLASSES = 10
LAMBDA = 0.5  # the reference README's CGC command: --lambda 0.5 -t 0.5
TEMPERATURE = 0.5
LEARNING_RATES = (0.1, 0.01)  # two optimizer steps, so that momentum and a rate drop count
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
# T per example: torchvision's (i, j, h, w) crop and the horizontal flip.
CROPS = np.array([[10, 20, 150, 120], [0, 0, 224, 224], [50, 30, 100, 180], [101, 90, 87, 70]])
FLIPS = np.array([True, False, True, False])

LOSS_RELATIVE_TOLERANCE = 1e-4
HEATMAP_TOLERANCE = 1e-5  # of the heatmap's maximum
GRADIENT_MIN_COSINE = 0.9999
GRADIENT_NORM_RATIO_TOLERANCE = 1e-3
WEIGHT_TOLERANCE = 1e-5
# Max |difference| of logits and layer4 features, relative to the largest value: eval mode
# (BN moving statistics) measured <= 2.4e-6; train mode measured up to 8.9e-5 (ResNet-50),
# float32 rounding amplified by batch-statistics BN over 64 values per channel at layer4.
# A wrong padding or stride gives differences of order 1.
ARCHITECTURE_TOLERANCE = {False: 1e-5, True: 5e-4}


def _import_reference(torch):
    """(resnet module, utils module, NCESoftmaxLoss class) of the reference code."""
    if REFERENCE_PACKAGE not in sys.modules:
        spec = importlib.machinery.ModuleSpec(REFERENCE_PACKAGE, None, is_package=True)
        package = importlib.util.module_from_spec(spec)
        package.__path__ = [str(REFERENCE_DIR / "models")]
        sys.modules[REFERENCE_PACKAGE] = package
    resnet = importlib.import_module(f"{REFERENCE_PACKAGE}.resnet_multigpu_cgc")
    utils = importlib.import_module(f"{REFERENCE_PACKAGE}.utils")
    # train_eval_cgc.py imports torchvision and its data code at the top; take only
    # the NCESoftmaxLoss class from its source.
    source = (REFERENCE_DIR / "train_eval_cgc.py").read_text()
    (class_node,) = [
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.ClassDef) and node.name == "NCESoftmaxLoss"
    ]
    namespace = {"torch": torch, "nn": torch.nn}
    exec(compile(ast.Module([class_node], []), "train_eval_cgc.py", "exec"), namespace)  # noqa: S102
    return resnet, utils, namespace["NCESoftmaxLoss"]


class _FixedTransform(augment.PairedAugmentation):
    """The reference's T with given crops and flips instead of random ones."""

    def __init__(self, crops, flips):
        super().__init__(crop_mode="torchvision")
        self.crops, self.flips = crops, flips

    def sample(self, batch_size, image_height, image_width):
        del batch_size, image_height, image_width  # Fixed.
        return {
            "crops": tf.constant(self.crops, tf.int32),
            "flips": tf.constant(self.flips),
            "layer_transformations": (),
        }


def _relative(got, expected):
    return abs(float(got) - float(expected)) / max(abs(float(expected)), 1e-12)


def _from_torch_layout(array):
    """Inverse of `backbones.to_torch_layout`."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def _ours(backbone, views, labels, reference_gradients):
    """Our losses, heatmaps and gradients; CoupledSGD steps on the reference's gradients."""
    x_xe, x_orig, x_aug = (tf.constant(view) for view in views)
    labels = tf.constant(labels)
    transform = _FixedTransform(CROPS, FLIPS)
    model = CGCModel(
        backbone,
        target_layer="conv5_block2_out",
        lambda_=LAMBDA,
        temperature=TEMPERATURE,
        views=3,
        augmentation=transform,
    )
    model.compile(
        optimizer=optimizers.CoupledSGD(
            LEARNING_RATES[0], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        ),
        jit_compile=False,
    )
    results = {}
    results["ce"] = [
        float(tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            labels, backbone(view, training=True), from_logits=True)))
        for view in (x_xe, x_orig, x_aug)
    ]
    terms = model.consistency_terms(x_orig, training=True)
    results["cgc"] = float(terms["loss"])
    results["mse"] = float(losses.mse(terms["anchors"], terms["positives"]))
    masks = {}
    _, cam, class_index = gradcam_lib.gradcam(model.extractor, x_orig, training=True)
    masks["orig"] = gradcam_lib.sum_normalize(gradcam_lib.upsample(cam, (SIZE, SIZE)))
    masks["warped"] = transform.apply_to_heatmaps(masks["orig"], transform.sample(4, SIZE, SIZE))
    _, cam, _ = gradcam_lib.gradcam(model.extractor, x_aug, class_index, training=True)
    masks["aug"] = gradcam_lib.sum_normalize(gradcam_lib.upsample(cam, (SIZE, SIZE)))
    results["masks"] = {name: mask.numpy() for name, mask in masks.items()}
    results["class_index"] = class_index.numpy()
    data = ({"image": x_orig, "classification_view": x_xe}, labels)
    terms, gradients = model._loss_and_gradients(model._parse(data))
    results["total"] = float(terms.total)
    variables = model.trainable_variables
    results["gradients"] = {
        backbones.torchvision_name(v.path): backbones.to_torch_layout(g.numpy())
        for v, g in zip(variables, gradients)
    }
    results["own_step"] = {
        backbones.torchvision_name(v.path): backbones.to_torch_layout(
            (v - LEARNING_RATES[0] * (g + WEIGHT_DECAY * v)).numpy()
        )
        for v, g in zip(variables, gradients)
    }
    # The optimizer on its own: the reference's gradients, so that float32 rounding in
    # the two backward passes does not enter the comparison of the updates.
    shared = [
        tf.constant(_from_torch_layout(reference_gradients[backbones.torchvision_name(v.path)]))
        for v in variables
    ]
    for rate in LEARNING_RATES:
        model.optimizer.learning_rate = rate
        model.optimizer.apply(shared, variables)
    results["stepped"] = {
        backbones.torchvision_name(v.path): backbones.to_torch_layout(v.numpy())
        for v in variables
    }
    return results


def _reference(torch, state_dict, views, labels):
    """The reference's losses, heatmaps, gradients and one torch.optim.SGD step."""
    resnet, utils, nce_softmax_loss = _import_reference(torch)
    model = resnet.resnet18(num_classes=NUM_CLASSES)
    missing, unexpected = model.load_state_dict(
        {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in state_dict.items()},
        strict=False,
    )
    assert not unexpected and all(name.endswith("num_batches_tracked") for name in missing)
    model.train()  # as the reference trains: BatchNorm on batch statistics
    mean = np.asarray(backbones.IMAGENET_MEAN, np.float32)
    std = np.asarray(backbones.IMAGENET_STD, np.float32)
    x_xe, x_orig, x_aug = (
        torch.from_numpy(np.ascontiguousarray(((v - mean) / std).transpose(0, 3, 1, 2)))
        for v in views
    )
    targets = torch.from_numpy(labels.astype(np.int64))
    aug_params = {
        "transforms_i": torch.from_numpy(CROPS[:, 0]),
        "transforms_j": torch.from_numpy(CROPS[:, 1]),
        "transforms_h": torch.from_numpy(CROPS[:, 2]),
        "transforms_w": torch.from_numpy(CROPS[:, 3]),
        "hor_flip": torch.from_numpy(FLIPS),
    }
    xent = torch.nn.CrossEntropyLoss()
    contrastive = nce_softmax_loss(TEMPERATURE)

    def forward(disable_contrast=False):
        return model(
            x_orig, contrastive, xe_images=x_xe, aug_images=x_aug, aug_params_dict=aug_params,
            targets=targets, xent_criterion=xent, disable_contrast=disable_contrast,
        )

    results = {}
    with torch.no_grad():
        results["ce"] = [
            float(xent(model.forward_vanilla(view), targets)) for view in (x_xe, x_orig, x_aug)
        ]
    outputs, features = model.forward_vanilla(x_orig, return_feats=True)
    target = np.argmax(outputs.detach().numpy(), axis=-1)
    masks = {"orig": utils.compute_gradcam_mask(outputs, features, target, model.relu)}
    masks["warped"] = utils.perform_gradcam_aug(masks["orig"], aug_params)
    outputs, features = model.forward_vanilla(x_aug, return_feats=True)
    masks["aug"] = utils.compute_gradcam_mask(outputs, features, target, model.relu)
    results["masks"] = {name: mask.detach().numpy() for name, mask in masks.items()}
    results["class_index"] = target
    results["mse"] = float(forward(disable_contrast=True)[2].detach())
    optimizer = torch.optim.SGD(
        model.parameters(), LEARNING_RATES[0], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    optimizer.zero_grad()
    _, xe_loss, sim_loss = forward()
    loss = xe_loss + LAMBDA * sim_loss
    loss.backward()
    results["xe"], results["cgc"], results["total"] = (
        float(xe_loss.detach()), float(sim_loss.detach()), float(loss.detach())
    )
    parameters = dict(model.named_parameters())
    results["gradients"] = {name: p.grad.numpy().copy() for name, p in parameters.items()}
    for rate in LEARNING_RATES:  # the same gradients twice: the second step reads momentum
        for group in optimizer.param_groups:
            group["lr"] = rate
        optimizer.step()
        if rate == LEARNING_RATES[0]:
            results["own_step"] = {
                name: p.detach().numpy().copy() for name, p in parameters.items()
            }
    results["stepped"] = {name: p.detach().numpy().copy() for name, p in parameters.items()}
    return results


@pytest.mark.slow
class ReferenceParityTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        torch = pytest.importorskip("torch")
        if not (REFERENCE_DIR / "models" / "resnet_multigpu_cgc.py").is_file():
            pytest.skip(f"the reference code is not at {REFERENCE_DIR}")
        torch.manual_seed(0)
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        backbone = backbones.resnet18((SIZE, SIZE, 3), num_classes=NUM_CLASSES)
        # Non-trivial BN parameters and statistics, so that a mix-up of gamma/beta or
        # mean/variance in the weight copy shows.
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                channels = layer.gamma.shape
                layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
                layer.beta.assign(rng.normal(0.0, 0.1, channels))
                layer.moving_mean.assign(rng.normal(0.0, 0.1, channels))
                layer.moving_variance.assign(rng.uniform(0.5, 1.5, channels))
        state_dict = backbones.torchvision_state_dict(backbone)
        x_orig = rng.uniform(0.0, 1.0, (4, SIZE, SIZE, 3)).astype(np.float32)
        x_xe = rng.uniform(0.0, 1.0, (4, SIZE, SIZE, 3)).astype(np.float32)
        x_aug = resample.resized_crop(x_orig, CROPS, FLIPS, (SIZE, SIZE)).numpy()
        labels = rng.integers(0, NUM_CLASSES, 4).astype(np.int32)
        views = (x_xe, x_orig, x_aug)
        # The reference calls .cuda() on its tensors; here they stay on the CPU.
        with mock.patch.object(torch.Tensor, "cuda", lambda tensor, *_, **__: tensor):
            cls.reference = _reference(torch, state_dict, views, labels)
        cls.ours = _ours(backbone, views, labels, cls.reference["gradients"])
        cls.differences = {}

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "differences", None):
            print("\nreference parity, measured:")
            for name, value in sorted(cls.differences.items()):
                print(f"  {name}: {value:.3g}")
        super().tearDownClass()

    def test_same_target_class(self):
        self.assertAllEqual(self.ours["class_index"], self.reference["class_index"])

    def test_losses(self):
        ours, reference = self.ours, self.reference
        self.assertLen(ours["ce"], 3)
        for name, got, expected in (
            *((f"ce_{view}", g, e) for view, g, e in zip(("xe", "orig", "aug"), ours["ce"], reference["ce"])),
            ("ce_sum", sum(ours["ce"]), reference["xe"]),
            ("cgc", ours["cgc"], reference["cgc"]),
            ("mse", ours["mse"], reference["mse"]),
            ("total", ours["total"], reference["total"]),
        ):
            difference = _relative(got, expected)
            self.differences[f"loss {name} relative"] = difference
            self.assertLess(difference, LOSS_RELATIVE_TOLERANCE, f"{name}: {got} vs {expected}")

    def test_heatmaps_before_and_after_the_warp(self):
        for name in ("orig", "aug", "warped"):
            got, expected = self.ours["masks"][name], self.reference["masks"][name]
            self.assertEqual(got.shape, expected.shape)
            difference = np.abs(got - expected).max() / np.abs(expected).max()
            self.differences[f"heatmap {name} max |diff| / max"] = difference
            self.assertLess(difference, HEATMAP_TOLERANCE, name)

    def test_every_parameter_gradient(self):
        ours, reference = self.ours["gradients"], self.reference["gradients"]
        self.assertEqual(sorted(ours), sorted(reference))
        cosines, ratios = [], []
        for name, expected in reference.items():
            got = ours[name].astype(np.float64).ravel()
            expected = expected.astype(np.float64).ravel()
            cosine = got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected))
            ratio = np.linalg.norm(got) / np.linalg.norm(expected)
            cosines.append(cosine)
            ratios.append(abs(ratio - 1.0))
            self.assertGreaterEqual(cosine, GRADIENT_MIN_COSINE, name)
            self.assertLess(abs(ratio - 1.0), GRADIENT_NORM_RATIO_TOLERANCE, name)
        self.differences["gradient 1 - min cosine"] = 1.0 - min(cosines)
        self.differences["gradient max |norm ratio - 1|"] = max(ratios)

    def test_optimizer_steps(self):
        # CoupledSGD and torch.optim.SGD, from the same weights with the same gradients.
        ours, reference = self.ours["stepped"], self.reference["stepped"]
        self.assertEqual(sorted(ours), sorted(reference))
        largest = 0.0
        for name, expected in reference.items():
            difference = np.abs(ours[name] - expected).max()
            largest = max(largest, float(difference))
            self.assertLess(difference, WEIGHT_TOLERANCE, name)
        self.differences["weights after two SGD steps, same gradients, max |diff|"] = largest

    def test_full_step_with_each_side_gradients(self):
        # Each side's first step with its own gradients differs by lr times the
        # gradient difference, whose L2 norm the gradient tolerances bound:
        # |g - e| <= |e| sqrt((r - 1)^2 + 2 r (1 - cosine)).
        ours, reference = self.ours["own_step"], self.reference["own_step"]
        ratio = 1.0 + GRADIENT_NORM_RATIO_TOLERANCE
        relative = np.sqrt((ratio - 1.0) ** 2 + 2.0 * ratio * (1.0 - GRADIENT_MIN_COSINE))
        largest = 0.0
        for name, expected in reference.items():
            difference = float(np.abs(ours[name] - expected).max())
            largest = max(largest, difference)
            gradient_norm = np.linalg.norm(self.reference["gradients"][name])
            self.assertLessEqual(difference, LEARNING_RATES[0] * gradient_norm * relative, name)
        self.differences["weights after one full step (own gradients) max |diff|"] = largest

@pytest.mark.slow
class ReferenceArchitectureTest(tf.test.TestCase, parameterized.TestCase):
    """Our ResNet-34/50 compute the reference's (torchvision's) forward pass."""

    differences = {}

    @classmethod
    def tearDownClass(cls):
        for name, value in sorted(cls.differences.items()):
            print(f"\n  {name}: {value:.3g}", end="")
        super().tearDownClass()

    @parameterized.parameters("resnet34", "resnet50")
    def test_logits_and_features_equal_the_reference(self, arch):
        torch = pytest.importorskip("torch")
        if not (REFERENCE_DIR / "models" / "resnet_multigpu_cgc.py").is_file():
            self.skipTest(f"the reference code is not at {REFERENCE_DIR}")
        resnet, _, _ = _import_reference(torch)
        keras.utils.set_random_seed(1)
        rng = np.random.default_rng(1)
        model, target_layer = backbones.build(arch, (128, 128, 3), num_classes=NUM_CLASSES)
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                channels = layer.gamma.shape
                layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
                layer.moving_mean.assign(rng.normal(0.0, 0.1, channels))
                layer.moving_variance.assign(rng.uniform(0.5, 1.5, channels))
        reference = getattr(resnet, arch)(num_classes=NUM_CLASSES)
        reference.load_state_dict(
            {k: torch.from_numpy(np.ascontiguousarray(v))
             for k, v in backbones.torchvision_state_dict(model).items()},
            strict=False,
        )
        images = rng.uniform(0.0, 1.0, (4, 128, 128, 3)).astype(np.float32)
        mean = np.asarray(backbones.IMAGENET_MEAN, np.float32)
        std = np.asarray(backbones.IMAGENET_STD, np.float32)
        normalised = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy())
        extractor = gradcam_lib.feature_model(model, target_layer)
        for training in (False, True):
            reference.train(training)
            with torch.no_grad():
                logits, features = reference.forward_vanilla(normalised, return_feats=True)
            our_features, our_logits = extractor(images, training=training)
            # Float32 sums over 34 or 50 layers: compare with each tensor's scale.
            for got, expected in (
                (our_logits, logits.numpy()),
                (our_features, features.numpy().transpose(0, 2, 3, 1)),
            ):
                difference = np.abs(np.asarray(got) - expected).max() / np.abs(expected).max()
                key = f"{arch} {'train' if training else 'eval'} mode max |diff| / max"
                self.differences[key] = max(self.differences.get(key, 0.0), float(difference))
                self.assertLess(difference, ARCHITECTURE_TOLERANCE[training], (arch, training))


if __name__ == "__main__":
    tf.test.main()
