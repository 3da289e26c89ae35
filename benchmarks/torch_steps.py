"""PyTorch training steps for the side-by-side benchmarks (no flags: steps from arguments).

`reference_torch` times them alone; `step_time --torch_reference=...` times them
interleaved with our TensorFlow steps in the same process. Two kinds of step:
  transcription  a transcription in plain PyTorch of what the published CGC code
                 computes per step (METHOD.md): plain (one view, cross-entropy,
                 backward, SGD), cgc3 (three forward passes x_xe, x_orig,
                 x_aug = T(x_orig); Grad-CAM of x_orig and x_aug for the class
                 predicted on x_orig with `torch.autograd.grad(...,
                 create_graph=True)`; bilinear upsampling, sum-normalisation;
                 warp of cam(x_orig) by T; InfoNCE, temperature 0.5; CE on the
                 three views + 0.5 * InfoNCE; backward; SGD) and cgc2 (without
                 x_xe). ResNet-18/50 are written here with torch.nn (torchvision
                 is not used: its PyPI build does not import beside every torch build);
  reference      the published code itself: models/resnet_multigpu_cgc.py of the
                 reference, its `forward(..., vanilla=True)` for plain and its
                 CGC `forward` (3 views, Grad-CAM, warp, InfoNCE; 224x224 only)
                 for cgc3, `.cuda()` a no-op on a machine without CUDA.
`autocast` "bfloat16" or "float16" runs forward and loss under
`torch.autocast(device_type="cpu", dtype=...)`, torch's mixed precision.
Every step: SGD, learning rate 0.01, momentum 0.9, weight decay 1e-4.
"""

import contextlib
import math
import os
import sys

ARCHS = ("resnet18", "resnet50")
MODEL_CODES = ("transcription", "reference")
# Variants each kind of step has (`benchmarks.common.STEP_VARIANTS` names).
MODEL_CODE_VARIANTS = {"transcription": ("plain", "cgc3", "cgc2"), "reference": ("plain", "cgc3")}
AUTOCASTS = ("none", "bfloat16", "float16")
# The reference repository beside this one (holds models/resnet_multigpu_cgc.py).
DEFAULT_REFERENCE_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "reference-cgc"
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
    from torch.nn import functional

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
    from torch.nn import functional

    cam = functional.interpolate(
        cam[:, None], size=(size, size), mode="bilinear", align_corners=False
    )
    return cam / (cam.sum(dim=(2, 3), keepdim=True) + EPSILON) + EPSILON


def _info_nce(anchors, positives):
    import torch
    from torch.nn import functional

    anchors = functional.normalize(anchors.flatten(1), dim=1)
    positives = functional.normalize(positives.flatten(1), dim=1)
    positive = (anchors * positives).sum(dim=1, keepdim=True)
    similarities = anchors @ anchors.t()
    batch = anchors.shape[0]
    mask = ~torch.eye(batch, dtype=torch.bool)
    negatives = similarities[mask].view(batch, batch - 1)
    logits = torch.cat([positive, negatives], dim=1) / TEMPERATURE
    return functional.cross_entropy(logits, torch.zeros(batch, dtype=torch.long))


def autocast_context(autocast):
    """torch.autocast on the CPU for `autocast` "bfloat16"/"float16"; a no-op for "none"."""
    import torch

    if autocast not in AUTOCASTS:
        raise ValueError(f"autocast={autocast!r} must be one of {AUTOCASTS}")
    if autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cpu", dtype=getattr(torch, autocast))


def random_batch(batch_size, image_size, num_classes, seed):
    """(x_xe, x_orig): float32 [B, 3, S, S] in [0, 1]; labels int64 [B]; seeded."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, 3, image_size, image_size)
    return (
        torch.rand(shape, generator=generator),
        torch.rand(shape, generator=generator),
        torch.randint(0, num_classes, (batch_size,), generator=generator),
    )


def _optimizer(model):
    import torch

    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


def _reference_step(variant, arch, num_classes, batch, size, seed, autocast, reference_dir):
    """A step of `variant` ("plain" or "cgc3") with the reference's own model code."""
    import torch
    from torch.nn import functional

    if not torch.cuda.is_available():
        # The reference moves tensors with .cuda(); on a CPU-only machine that is
        # a no-op here, as it is with one GPU's tensors already there.
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    if os.path.abspath(reference_dir) not in sys.path:
        sys.path.insert(0, os.path.abspath(reference_dir))
    from models import resnet_multigpu_cgc  # the reference's package (MIT)

    torch.manual_seed(seed)
    model = getattr(resnet_multigpu_cgc, arch)(num_classes=num_classes)
    model.train()
    optimizer = _optimizer(model)
    x_xe, x_orig, labels = batch
    generator = torch.Generator().manual_seed(seed)

    def nce(logits):  # train_eval_cgc.py's NCESoftmaxLoss, without its .cuda()
        return functional.cross_entropy(
            logits.squeeze() / TEMPERATURE, torch.zeros(logits.shape[0], dtype=torch.long)
        )

    def plain():
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(autocast):
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
        with autocast_context(autocast):
            _, xe_loss, contrastive_loss = model(
                x_orig, nce, xe_images=x_xe, aug_images=x_aug, aug_params_dict=params,
                targets=labels, xent_criterion=torch.nn.CrossEntropyLoss(),
            )
            loss = xe_loss.mean() + LAMBDA * contrastive_loss.mean()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return plain if variant == "plain" else cgc3


def _transcription_step(variant, arch, num_classes, batch, size, seed, autocast):
    """A step of `variant` with the ResNet and CGC step transcribed here."""
    import torch
    from torch.nn import functional

    torch.manual_seed(seed)
    model = _torch_modules()(arch, num_classes)
    model.train()
    optimizer = _optimizer(model)
    x_xe, x_orig, labels = batch
    generator = torch.Generator().manual_seed(seed)

    def plain():
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(autocast):
            _, logits = model(x_xe)
            loss = functional.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def cgc(views):
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(autocast):
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


def make_step(
    model_code, variant, arch, num_classes, batch, seed, autocast="none",
    reference_dir=DEFAULT_REFERENCE_DIR,
):
    """A callable running one optimizer step; blocks until done, returns the loss.

    Args:
      model_code: "transcription" or "reference" (module docstring).
      variant: one of MODEL_CODE_VARIANTS[model_code].
      arch: "resnet18" or "resnet50" (the reference's code also has "resnet34").
      num_classes: int K.
      batch: from `random_batch`, side S = its images' last dimension.
      seed: weight initialisation and transform seed.
      autocast: "none", "bfloat16" or "float16".
      reference_dir: the reference repository, for model_code="reference".

    Returns:
      callable () -> float loss.
    """
    if model_code not in MODEL_CODES:
        raise ValueError(f"model_code={model_code!r} must be one of {MODEL_CODES}")
    if variant not in MODEL_CODE_VARIANTS[model_code]:
        raise ValueError(
            f"variant={variant!r} must be one of {MODEL_CODE_VARIANTS[model_code]} for "
            f"model_code={model_code!r}"
        )
    size = batch[0].shape[-1]
    if model_code == "reference":
        return _reference_step(variant, arch, num_classes, batch, size, seed, autocast, reference_dir)
    return _transcription_step(variant, arch, num_classes, batch, size, seed, autocast)
