"""Networks for the main job: a small MLP (the default), a small convolutional net and
torchvision's ResNet-18, the last two with BatchNorm or, for the ``_gn`` variants,
GroupNorm.

Under DDP (the main job's torchrun path) a BatchNorm layer normalises each rank's
mini-batch with that rank's own batch statistics; there is no SyncBatchNorm, on purpose:
whether a rank that replays only its own shard sees skewed statistics is what the study's
``cnn`` against ``cnn_gn`` comparison measures. DDP broadcasts rank 0's running
statistics to the other ranks at every forward pass, so evaluation uses rank 0's.
GroupNorm normalises each sample on its own, so it has no batch statistics at all.
"""

from __future__ import annotations

import math
from typing import Callable, Tuple

import torch
from torch import nn

from .cli import MODELS


class MLP(nn.Module):
    """Flatten, then two hidden ReLU layers of width ``hidden``.

    Input ``(n, *sample_shape)`` float32; output logits ``(n, n_classes)`` float32.
    """

    def __init__(self, sample_shape: Tuple[int, ...], n_classes: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(sample_shape), hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def image_shape(sample_shape: Tuple[int, ...]) -> Tuple[int, int, int]:
    """``(C, H, W)`` of a sample: itself when it has three dimensions, ``(1, s, s)`` for a
    flat sample of ``s * s`` values (the bundled digits: 64 values, ``(1, 8, 8)``).
    Raises ``ValueError`` for any other shape."""
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        if side * side == shape[0]:
            return (1, side, side)
    raise ValueError(f"a convolutional model needs (C, H, W) samples or flat samples of a "
                     f"square number of values, got shape {shape}")


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """``channels -> layer``: ``"batch"``: ``BatchNorm2d``; ``"group"``: ``GroupNorm`` with
    8 groups (fewer when the channels are not a multiple of 8)."""
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return lambda c: nn.GroupNorm(math.gcd(8, c), c)
    raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")


class SmallCNN(nn.Module):
    """Three 3x3 convolutions (16, 32, 32 channels), each followed by a normalisation
    layer (``norm``: ``"batch"`` or ``"group"``) and ReLU, a 2x2 max-pooling after the
    second, global average pooling and a linear classifier: about 14 k parameters, built
    for the 8x8 digits.

    Input ``(n, *sample_shape)`` float32, where ``sample_shape`` is ``(C, H, W)`` or a
    flat square (see :func:`image_shape`); output logits ``(n, n_classes)`` float32.
    """

    def __init__(self, sample_shape: Tuple[int, ...], n_classes: int, norm: str = "batch"):
        super().__init__()
        self.shape = image_shape(sample_shape)
        make = norm_layer(norm)
        c = self.shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1, bias=False), make(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), make(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), make(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(32, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.reshape(x.shape[0], *self.shape)))


def resnet18(sample_shape: Tuple[int, ...], n_classes: int, norm: str = "batch") -> nn.Module:
    """torchvision's ResNet-18 (random init) for ``(n, C, H, W)`` inputs: the stem takes
    ``C`` channels and, for images smaller than 64 px, is a 3x3 stride-1 convolution
    without max-pooling (the usual CIFAR variant). ``norm``: ``"batch"`` (torchvision's
    BatchNorm) or ``"group"`` (GroupNorm, 8 groups, in every block)."""
    import torchvision

    if len(sample_shape) != 3:
        raise ValueError(f"resnet18 needs (C, H, W) samples, got shape {tuple(sample_shape)}")
    c, h, w = sample_shape
    make = norm_layer(norm)
    model = torchvision.models.resnet18(num_classes=n_classes, norm_layer=make)
    if min(h, w) < 64:
        model.conv1 = nn.Conv2d(c, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif c != 3:
        model.conv1 = nn.Conv2d(c, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def build_model(name: str, sample_shape: Tuple[int, ...], n_classes: int, hidden: int = 128,
                seed: int = 0) -> nn.Module:
    """A freshly initialised network (one of :data:`MODELS`); the same ``seed`` gives the
    same weights. ``hidden`` is the MLP's width (the other models ignore it)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
    norm = "group" if name.endswith("_gn") else "batch"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            return MLP(sample_shape, n_classes, hidden)
        if name.startswith("cnn"):
            return SmallCNN(sample_shape, n_classes, norm)
        return resnet18(sample_shape, n_classes, norm)
