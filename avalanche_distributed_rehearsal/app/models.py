"""Networks for the main job: a small MLP (the default) and torchvision's ResNet-18."""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn


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


def resnet18(sample_shape: Tuple[int, ...], n_classes: int) -> nn.Module:
    """torchvision's ResNet-18 (random init) for ``(n, C, H, W)`` inputs: the stem takes
    ``C`` channels and, for images smaller than 64 px, is a 3x3 stride-1 convolution
    without max-pooling (the usual CIFAR variant)."""
    import torchvision

    if len(sample_shape) != 3:
        raise ValueError(f"resnet18 needs (C, H, W) samples, got shape {tuple(sample_shape)}")
    c, h, w = sample_shape
    model = torchvision.models.resnet18(num_classes=n_classes)
    if min(h, w) < 64:
        model.conv1 = nn.Conv2d(c, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif c != 3:
        model.conv1 = nn.Conv2d(c, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def build_model(name: str, sample_shape: Tuple[int, ...], n_classes: int, hidden: int = 128,
                seed: int = 0) -> nn.Module:
    """A freshly initialised network; the same ``seed`` gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            return MLP(sample_shape, n_classes, hidden)
        if name == "resnet18":
            return resnet18(sample_shape, n_classes)
    raise ValueError(f"model must be 'mlp' or 'resnet18', got {name!r}")
