"""Batch transforms on the training device: uint8 to float, and per-sample augmentation.

The main job's data sets yield un-augmented inputs (``--store-dtype uint8``: the raw
integer pixels); :class:`BatchTransform` turns a whole mini-batch into the model's
input on the device, drawing a fresh augmentation for every row:

* digits (8x8, values 0..16): random shifts by up to 1 pixel (zero fill);
* MNIST (28x28): random shifts by up to 2 pixels (a crop of the 2-pixel-padded image);
* Fashion-MNIST: the same plus a random horizontal flip;
* 32x32 images (CIFAR-10/100): random crop of the 4-pixel-padded image plus a random
  horizontal flip (the usual CIFAR augmentation); synthetic C,H,W images likewise, with
  a padding of ``max(1, H // 8)``.

Random draws come from torch's default generator of the batch's device, on the calling
thread: seeded runs are reproducible, and asynchronous and synchronous buffers see the
same augmentations. torchvision's v2 transforms, given a batch tensor, draw *one* crop
for the whole batch; these draw one per row.

:class:`TransformedModel` applies the training transform in ``train()`` mode and the
evaluation transform (conversion only) in ``eval()`` mode, for strategies that replay in
dataset space (Avalanche's stock methods: each forward pass then sees freshly
augmented rows, the buffer's included).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

#: ``dataset: (image shape of one sample, padding, flip)``
AUGMENTATIONS = {
    "digits": ((1, 8, 8), 1, False),
    "mnist": ((1, 28, 28), 2, False),
    "fashion-mnist": ((1, 28, 28), 2, True),
    "cifar10": ((3, 32, 32), 4, True),
    "cifar100": ((3, 32, 32), 4, True),
}
#: The integer range of each data set's raw pixels (``--store-dtype uint8``): digits
#: count 0..16 (scikit-learn's raw 8x8 digits), the torchvision images 0..255.
PIXEL_MAX = {"digits": 16, "mnist": 255, "fashion-mnist": 255, "cifar10": 255, "cifar100": 255}


def random_crop_flip(images: torch.Tensor, padding: int, flip: bool) -> torch.Tensor:
    """Each image of ``images`` ``(n, C, H, W)`` (floating point) shifted by its own random
    offset in ``[-padding, padding]`` in each direction (a crop of the zero-padded image)
    and, with ``flip``, mirrored left-right with probability 1/2. Returns a new tensor of
    the same shape, dtype and device."""
    n, c, h, w = images.shape
    device = images.device
    out = images
    if padding:
        padded = F.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), device=device)
        dx = torch.randint(0, 2 * padding + 1, (n,), device=device)
        rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
        out = padded[torch.arange(n, device=device)[:, None, None, None],
                     torch.arange(c, device=device)[None, :, None, None], rows, cols]
    if flip:
        mirrored = torch.rand(n, device=device) < 0.5
        out = torch.where(mirrored[:, None, None, None], out.flip(-1), out)
    return out if out is not images else images.clone()


class BatchTransform:
    """A mini-batch ``(n, *sample_shape)`` (uint8 or any dtype) to the model's float32
    input: integer batches are divided by ``pixel_max`` (to ``[0, 1]``), floating batches
    are taken as they are; then, with ``image_shape``, each row is viewed as an image of
    that shape and augmented (:func:`random_crop_flip`) and viewed back. Returns a new
    tensor on the batch's device. Picklable (a plain object, no closure)."""

    def __init__(self, pixel_max: float = 255.0, image_shape: Optional[Tuple[int, ...]] = None,
                 padding: int = 0, flip: bool = False):
        self.pixel_max = float(pixel_max)
        self.image_shape = None if image_shape is None else tuple(image_shape)
        self.padding = int(padding)
        self.flip = bool(flip)

    @property
    def augments(self) -> bool:
        return self.image_shape is not None and (self.padding > 0 or self.flip)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32) / self.pixel_max if not x.is_floating_point() else x
        if not self.augments:
            return x if x.dtype == torch.float32 else x.float()
        images = x.reshape((x.shape[0],) + self.image_shape)
        return random_crop_flip(images, self.padding, self.flip).reshape(x.shape)

    def __repr__(self) -> str:
        return (f"BatchTransform(pixel_max={self.pixel_max:g}, image_shape={self.image_shape}, "
                f"padding={self.padding}, flip={self.flip})")


def transforms_for(dataset: str, sample_shape: Tuple[int, ...], augment: bool,
                   integer_pixels: bool) -> Tuple[Optional[BatchTransform], Optional[BatchTransform]]:
    """``(train transform, eval transform)`` of the main job, each None when it would do
    nothing: conversion when the data set yields integer pixels (``integer_pixels``),
    augmentation (training only) with ``augment``. Raises ``ValueError`` when ``augment``
    is asked of data that are not images (synthetic vectors)."""
    pixel_max = PIXEL_MAX.get(dataset, 255) if integer_pixels else 1.0
    evaluation = BatchTransform(pixel_max) if integer_pixels else None
    if not augment:
        return evaluation, evaluation
    if dataset in AUGMENTATIONS:
        shape, padding, flip = AUGMENTATIONS[dataset]
    elif len(sample_shape) == 3:
        shape, padding, flip = tuple(sample_shape), max(1, sample_shape[1] // 8), True
    else:
        raise ValueError(f"--augment needs image data (C,H,W samples), got per-sample shape "
                         f"{tuple(sample_shape)}")
    return BatchTransform(pixel_max, shape, padding, flip), evaluation


class TransformedModel(nn.Module):
    """``model`` behind a batch transform: ``train_transform`` in training mode,
    ``eval_transform`` in evaluation mode (None: the input as given). No parameters of
    its own; ``state_dict`` keys gain a ``model.`` prefix."""

    def __init__(self, model: nn.Module, train_transform=None, eval_transform=None):
        super().__init__()
        self.model = model
        self.train_transform = train_transform
        self.eval_transform = eval_transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        transform = self.train_transform if self.training else self.eval_transform
        return self.model(x if transform is None else transform(x))
