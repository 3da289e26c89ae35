"""The reference (PyTorch) CGC step vs its plain step, for a side-by-side with step_time.

  pip install torch          # optional benchmark dependency, not a cgc-tf requirement
  python -m benchmarks.reference_torch --arch=resnet18 --image_size=224 --batch_size=16

A transcription in plain PyTorch of what the published CGC code computes per
step (METHOD.md), so our TensorFlow step can be compared with it on the same
machine in the same sitting:
  plain  ResNet forward of one view, cross-entropy, backward, SGD step;
  cgc3   three forward passes (x_xe, x_orig, x_aug = T(x_orig)); Grad-CAM of
         x_orig and x_aug for the class predicted on x_orig, with
         `torch.autograd.grad(..., create_graph=True)`; bilinear upsampling,
         sum-normalisation; warp of cam(x_orig) by T (crop the box, bilinear
         resize, flip); InfoNCE (temperature 0.5); CE on the three views +
         0.5 * InfoNCE; backward; SGD step;
  cgc2   the same without the x_xe view.
ResNet-18/50 are written here with torch.nn (torchvision is not used: its PyPI
build does not import beside every torch build). Timings are interleaved as in
step_time (wall clock and this process's CPU time).

`--model_code=reference` times the published code itself instead:
models/resnet_multigpu_cgc.py of the reference (`--reference_dir`, default
../shared/reference-cgc beside this repository), its `forward(..., vanilla=True)`
for plain and its CGC `forward` (3 views, Grad-CAM, warp, InfoNCE; 224x224
only: it resizes heatmaps to 224) for cgc3, with `.cuda()` made a no-op on a
machine without CUDA. `--autocast=bfloat16` runs forward and loss under
`torch.autocast(device_type="cpu", dtype=torch.bfloat16)`, torch's mixed
precision; a step that fails under it (the reference's CGC forward calls numpy
on a bfloat16 tensor) is reported with its error instead of a time.

Side by side with our step in one sitting (ResNet-18 224, batch 16):

  python -m benchmarks.step_time --variants=plain,cgc3 --dtype_policy=float32,auto
  python -m benchmarks.reference_torch --model_code=reference --variants=plain,cgc3
  python -m benchmarks.reference_torch --model_code=reference --variants=plain,cgc3 \
    --autocast=bfloat16
"""

import os
import sys

import math

from absl import app
from absl import flags

from benchmarks import common

VARIANTS = common.STEP_VARIANTS

_ARCH = flags.DEFINE_enum("arch", "resnet18", ("resnet18", "resnet50"), "Backbone.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input side S in pixels (>= 32).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Batch size (>= 2: InfoNCE needs negatives).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Number of classes (>= 2).")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Subset of {list(VARIANTS)}.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 2, "Untimed steps per variant (>= 1).")
_TIMED_STEPS = flags.DEFINE_integer("timed_steps", 5, "Timed steps per variant (>= 1).")
_THREADS = flags.DEFINE_integer("threads", None, "torch.set_num_threads; default torch's own.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the batch.")
_MODEL_CODE = flags.DEFINE_enum(
    "model_code", "transcription", ("transcription", "reference"),
    "transcription: the step written here; reference: the reference's own model code.",
)
_REFERENCE_DIR = flags.DEFINE_string(
    "reference_dir",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                 "reference-cgc"),
    "The reference repository (holds models/resnet_multigpu_cgc.py), for --model_code=reference.",
)
_AUTOCAST = flags.DEFINE_enum(
    "autocast", "none", ("none", "bfloat16"), "torch.autocast on the CPU for forward and loss."
)

LAMBDA = 0.5
TEMPERATURE = 0.5
EPSILON = 1e-8


def _torch_modules():
    """Model classes, defined on first use so this file imports without torch."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, inputs, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(inputs, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.shortcut = None
            if stride != 1 or inputs != planes:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(inputs, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + (x if self.shortcut is None else self.shortcut(x)))

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inputs, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(inputs, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.shortcut = None
            if stride != 1 or inputs != planes * 4:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(inputs, planes * 4, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * 4),
                )

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = torch.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return torch.relu(out + (x if self.shortcut is None else self.shortcut(x)))

    class ResNet(nn.Module):
        """torchvision's ResNet v1.5 layout; forward returns (layer4 features, logits)."""

        def __init__(self, block, layers, num_classes):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
            stages, inputs = [], 64
            for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
                for block_index in range(blocks):
                    stride = 2 if index > 0 and block_index == 0 else 1
                    stages.append(block(inputs, planes, stride))
                    inputs = planes * block.expansion
            self.trunk = nn.Sequential(*stages)
            self.fc = nn.Linear(inputs, num_classes)

        def forward(self, x):
            features = self.trunk(self.stem(x))
            return features, self.fc(features.mean(dim=(2, 3)))

    def build(arch, num_classes):
        if arch == "resnet18":
            return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)
        return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)

    return build


def _sample_transform(batch, size, generator):
    """Random resized crop boxes (area [0.08, 1], log-ratio [3/4, 4/3]) and flips."""
    import torch

    boxes = []
    for _ in range(batch):
        for _ in range(10):
            area = size * size * (0.08 + 0.92 * torch.rand(1, generator=generator).item())
            log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(
                1, generator=generator
            ).item()
            ratio = math.exp(log_ratio)
            width = int(round(math.sqrt(area * ratio)))
            height = int(round(math.sqrt(area / ratio)))
            if 0 < width <= size and 0 < height <= size:
                top = int(torch.randint(0, size - height + 1, (1,), generator=generator))
                left = int(torch.randint(0, size - width + 1, (1,), generator=generator))
                boxes.append((top, left, height, width))
                break
        else:
            boxes.append((0, 0, size, size))
    flips = (torch.rand(batch, generator=generator) < 0.5).tolist()
    return boxes, flips


def _warp(images, boxes, flips, size):
    """Crop each box, resize bilinearly to size x size, flip: [B, C, S, S] (differentiable)."""
    import torch
    import torch.nn.functional as functional

    outputs = []
    for index, (top, left, height, width) in enumerate(boxes):
        crop = images[index : index + 1, :, top : top + height, left : left + width]
        crop = functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        outputs.append(torch.flip(crop, dims=[3]) if flips[index] else crop)
    return torch.cat(outputs)


def _gradcam(features, logits, target):
    """ReLU(sum_k dz_c/dF * F) [B, h, w], differentiable (create_graph=True)."""
    import torch

    selected = logits.gather(1, target[:, None]).sum()
    gradients = torch.autograd.grad(selected, features, create_graph=True)[0]
    return torch.relu((gradients * features).sum(dim=1))


def _normalised_cam(cam, size):
    import torch.nn.functional as functional

    cam = functional.interpolate(
        cam[:, None], size=(size, size), mode="bilinear", align_corners=False
    )
    return cam / (cam.sum(dim=(2, 3), keepdim=True) + EPSILON) + EPSILON


def _info_nce(anchors, positives):
    import torch
    import torch.nn.functional as functional

    anchors = functional.normalize(anchors.flatten(1), dim=1)
    positives = functional.normalize(positives.flatten(1), dim=1)
    positive = (anchors * positives).sum(dim=1, keepdim=True)
    similarities = anchors @ anchors.t()
    batch = anchors.shape[0]
    mask = ~torch.eye(batch, dtype=torch.bool)
    negatives = similarities[mask].view(batch, batch - 1)
    logits = torch.cat([positive, negatives], dim=1) / TEMPERATURE
    return functional.cross_entropy(logits, torch.zeros(batch, dtype=torch.long))


def _reference_step(variant, batch, size):
    """A step of `variant` ("plain" or "cgc3") with the reference's own model code."""
    import torch
    import torch.nn.functional as functional

    if not torch.cuda.is_available():
        # The reference moves tensors with .cuda(); on a CPU-only machine that is
        # a no-op here, as it is with one GPU's tensors already there.
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, os.path.abspath(_REFERENCE_DIR.value))
    from models import resnet_multigpu_cgc  # the reference's package (MIT)

    torch.manual_seed(_SEED.value)
    model = getattr(resnet_multigpu_cgc, _ARCH.value)(num_classes=_NUM_CLASSES.value)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x_xe, x_orig, labels = batch
    generator = torch.Generator().manual_seed(_SEED.value)

    def nce(logits):  # train_eval_cgc.py's NCESoftmaxLoss, without its .cuda()
        return functional.cross_entropy(
            logits.squeeze() / TEMPERATURE, torch.zeros(logits.shape[0], dtype=torch.long)
        )

    def plain():
        optimizer.zero_grad(set_to_none=True)
        with _autocast():
            loss = functional.cross_entropy(model(x_xe, None, vanilla=True), labels)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def cgc3():
        optimizer.zero_grad(set_to_none=True)
        boxes, flips = _sample_transform(len(labels), size, generator)
        x_aug = _warp(x_orig, boxes, flips, size)
        # train_eval_cgc.py's augmentation parameters: crop top/left/height/width, flip.
        params = {
            key: torch.tensor([box[index] for box in boxes])
            for index, key in enumerate(("transforms_i", "transforms_j", "transforms_h",
                                         "transforms_w"))
        }
        params["hor_flip"] = torch.tensor(flips)
        with _autocast():
            _, xe_loss, contrastive_loss = model(
                x_orig, nce, xe_images=x_xe, aug_images=x_aug, aug_params_dict=params,
                targets=labels, xent_criterion=torch.nn.CrossEntropyLoss(),
            )
            loss = xe_loss.mean() + LAMBDA * contrastive_loss.mean()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return plain if variant == "plain" else cgc3


def _autocast():
    import contextlib

    import torch

    if _AUTOCAST.value == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


def make_step(variant, build, batch, size):
    """A callable running one optimizer step of `variant`."""
    import torch
    import torch.nn.functional as functional

    torch.manual_seed(_SEED.value)
    model = build(_ARCH.value, _NUM_CLASSES.value)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x_xe, x_orig, labels = batch
    generator = torch.Generator().manual_seed(_SEED.value)

    def plain():
        optimizer.zero_grad(set_to_none=True)
        with _autocast():
            _, logits = model(x_xe)
            loss = functional.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def cgc(views):
        with _autocast():
            return cgc_step(views)

    def cgc_step(views):
        optimizer.zero_grad(set_to_none=True)
        boxes, flips = _sample_transform(len(labels), size, generator)
        x_aug = _warp(x_orig, boxes, flips, size)
        features_orig, logits_orig = model(x_orig)
        features_aug, logits_aug = model(x_aug)
        target = logits_orig.argmax(dim=1)
        cam_orig = _normalised_cam(_gradcam(features_orig, logits_orig, target), size)
        cam_aug = _normalised_cam(_gradcam(features_aug, logits_aug, target), size)
        warped = _warp(cam_orig, boxes, flips, size)
        loss = functional.cross_entropy(logits_orig, labels) + functional.cross_entropy(
            logits_aug, labels
        )
        if views == 3:
            _, logits_xe = model(x_xe)
            loss = loss + functional.cross_entropy(logits_xe, labels)
        loss = loss + LAMBDA * _info_nce(cam_aug, warped)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    if variant == "plain":
        return plain
    return lambda: cgc(int(variant[-1]))


def main(argv):
    del argv  # Unused.
    import torch

    if _THREADS.value:
        torch.set_num_threads(_THREADS.value)
    common.check_subsets((("variants", _VARIANTS.value, VARIANTS),))
    common.check_minimums(
        (("batch_size", _BATCH_SIZE.value, 2), ("image_size", _IMAGE_SIZE.value, 32))
    )
    reference = _MODEL_CODE.value == "reference"
    if reference:
        common.check_subsets((("variants", _VARIANTS.value, ("plain", "cgc3")),))
        if "cgc3" in _VARIANTS.value and _IMAGE_SIZE.value != 224:
            raise app.UsageError("--model_code=reference's CGC step needs --image_size=224")
    build = _torch_modules()
    generator = torch.Generator().manual_seed(_SEED.value)
    shape = (_BATCH_SIZE.value, 3, _IMAGE_SIZE.value, _IMAGE_SIZE.value)
    batch = (
        torch.rand(shape, generator=generator),
        torch.rand(shape, generator=generator),
        torch.randint(0, _NUM_CLASSES.value, (_BATCH_SIZE.value,), generator=generator),
    )
    steps, errors = {}, {}
    for variant in _VARIANTS.value:
        if reference:
            step = _reference_step(variant, batch, _IMAGE_SIZE.value)
        else:
            step = make_step(variant, build, batch, _IMAGE_SIZE.value)
        try:
            step()  # one untimed step: a step that cannot run is reported, not timed
        except Exception as error:  # pylint: disable=broad-except
            errors[variant] = f"{type(error).__name__}: {error}"
            continue
        steps[variant] = step
    description = common.host_description()
    times = common.interleaved_times(steps, _WARMUP_STEPS.value, _TIMED_STEPS.value)
    description.update(
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        load_average_after=common.load_average(),
    )
    records = []
    for variant in _VARIANTS.value:
        record = {
            "benchmark": "reference_torch",
            "variant": variant,
            "arch": _ARCH.value,
            "image_size": _IMAGE_SIZE.value,
            "batch_size": _BATCH_SIZE.value,
            "num_classes": _NUM_CLASSES.value,
            "model_code": _MODEL_CODE.value,
            "autocast": _AUTOCAST.value,
        }
        if variant in errors:
            record["error"] = errors[variant]
            records.append(record)
            continue
        record.update(common.summarize(times[variant]))
        if "plain" in times:
            record["plain_median_s"] = common.summarize(times["plain"])["median_s"]
            record.update(common.ratios_to(times[variant], times["plain"], "plain"))
        record["machine"] = description
        records.append(record)
    machine = (
        f"device: CPU {description['cpu']} x{description['cores']} cores; torch "
        f"{description['torch']} ({description['torch_threads']} threads); load average "
        f"{description['load_average']}"
    )
    settings = (
        f"reference (PyTorch, {_MODEL_CODE.value} code, autocast {_AUTOCAST.value}) "
        f"{_ARCH.value} {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value} batch "
        f"{_BATCH_SIZE.value}; {_WARMUP_STEPS.value} warm-up + {_TIMED_STEPS.value} timed steps, "
        "interleaved"
    )
    columns = [("variant", "variant"), *common.PLAIN_COMPARISON_COLUMNS, ("error", "error")]
    common.print_report([machine, settings], records, columns)


if __name__ == "__main__":
    app.run(main)
