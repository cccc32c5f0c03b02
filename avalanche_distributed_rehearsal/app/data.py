"""Datasets as in-memory tensors, and the class-incremental benchmark built over them.

Every loader returns ``(train, test, n_classes)`` where ``train`` and ``test`` are
``TensorDataset(x, y)`` with ``x`` float32 ``(n, *sample_shape)`` in ``[0, 1]`` (synthetic:
roughly unit scale), ``y`` int64 ``(n,)`` class labels ``0 .. n_classes - 1``, and a
``targets`` list attribute (what Avalanche's ``nc_benchmark`` reads). With ``raw=True``
(``--store-dtype uint8``) ``x`` holds the data set's raw integer pixels as uint8 instead
(digits: 0..16, the torchvision images: 0..255), un-normalised: the batch transform of
:mod:`.augment` converts them on the device. Nothing is downloaded unless ``download=True``.
"""

from __future__ import annotations

import math
import os
from typing import Tuple

import torch
from torch.utils.data import TensorDataset

from .cli import Config


class DataUnavailableError(RuntimeError):
    """The dataset is not on disk and may not be downloaded; the message says what to do."""


def _tensor_dataset(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    ds = TensorDataset(x.contiguous(), y.to(torch.int64).contiguous())
    ds.targets = ds.tensors[1].tolist()
    return ds


def load_digits(seed: int = 0, n_train: int = 1400, raw: bool = False
                ) -> Tuple[TensorDataset, TensorDataset, int]:
    """scikit-learn's bundled 8x8 digits (1797 samples): ``x`` ``(n, 64)`` float32 in [0, 1]
    (the raw pixel counts, integers 0..16, divided by 16), or with ``raw`` those counts
    as uint8.

    A fixed split seeded by ``seed``: ``n_train`` training samples, the rest for testing.
    """
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.data, dtype=torch.uint8 if raw else torch.float32)
    if not raw:
        x = x / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:]
    return _tensor_dataset(x[tr], y[tr]), _tensor_dataset(x[te], y[te]), 10


def load_synthetic(n_train: int, shape: Tuple[int, ...], n_classes: int, seed: int = 0
                   ) -> Tuple[TensorDataset, TensorDataset, int]:
    """Class-conditional Gaussians: ``x`` ``(n, *shape)`` float32, ``n_train`` training and
    ``max(n_classes, n_train // 5)`` test samples, classes balanced (round robin).

    Each class has a random prototype; samples are prototype + noise, so the task is
    learnable but not trivial. Deterministic in ``seed``. Memory: ``4 * n * prod(shape)`` bytes.
    """
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    protos = torch.randn(n_classes, d, generator=g)

    def make(n: int) -> TensorDataset:
        y = torch.arange(n, dtype=torch.int64) % n_classes
        y = y[torch.randperm(n, generator=g)]
        x = protos[y] * 0.5 + torch.randn(n, d, generator=g)
        return _tensor_dataset(x.reshape(n, *shape), y)

    return make(n_train), make(max(n_classes, n_train // 5)), n_classes


_TORCHVISION = {"mnist": ("MNIST", 10), "fashion-mnist": ("FashionMNIST", 10),
                "cifar10": ("CIFAR10", 10), "cifar100": ("CIFAR100", 100)}


def load_torchvision(name: str, root: str, download: bool, raw: bool = False
                     ) -> Tuple[TensorDataset, TensorDataset, int]:
    """MNIST / Fashion-MNIST (``(n, 1, 28, 28)``) or CIFAR-10/100 (``(n, 3, 32, 32)``), float32
    in [0, 1] (uint8 0..255 with ``raw``), from ``root``; downloaded there first only if
    ``download``."""
    import torchvision.datasets as tvd

    cls_name, n_classes = _TORCHVISION[name]
    cls = getattr(tvd, cls_name)
    try:
        train, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found. You can use download=True ..."
        if download:
            raise DataUnavailableError(f"could not download {cls_name} into --data-root {root!r} "
                                       f"(are you online?): {e}") from None
        raise DataUnavailableError(f"{cls_name} not found under --data-root {root!r}; pass "
                                   "--download to fetch it (needs internet)") from None
    except OSError as e:  # no network, DNS failure, ...
        raise DataUnavailableError(f"could not download {cls_name} into --data-root {root!r} "
                                   f"(are you online?): {e}") from None

    def convert(ds) -> TensorDataset:
        x = torch.as_tensor(ds.data)
        if x.dim() == 3:  # (n, H, W) uint8
            x = x.unsqueeze(1)
        else:  # (n, H, W, C) uint8
            x = x.permute(0, 3, 1, 2)
        return _tensor_dataset(x if raw else x.float().div_(255.0), torch.as_tensor(ds.targets))

    return convert(train), convert(test), n_classes


def load_data(cfg: Config, rank: int = 0, barrier=None) -> Tuple[TensorDataset, TensorDataset, int]:
    """The dataset ``cfg.dataset`` as ``(train, test, n_classes)`` (see the module docstring).

    Under torchrun only rank 0 downloads; the others wait at ``barrier()`` and then read
    the files it wrote.
    """
    raw = cfg.store_dtype == "uint8"
    if cfg.dataset == "digits":
        return load_digits(cfg.seed, raw=raw)
    if cfg.dataset == "synthetic":
        return load_synthetic(cfg.synthetic_size, cfg.synthetic_shape, cfg.synthetic_classes, cfg.seed)
    root = os.path.expanduser(cfg.data_root)
    if cfg.download and barrier is not None:
        error = None
        if rank == 0:
            try:
                load_torchvision(cfg.dataset, root, True, raw)
            except DataUnavailableError as e:
                error = e
        barrier()
        if error is not None:
            raise error
        return load_torchvision(cfg.dataset, root, rank == 0, raw)
    return load_torchvision(cfg.dataset, root, cfg.download, raw)


def make_benchmark(train: TensorDataset, test: TensorDataset, n_classes: int,
                   n_experiences: int, seed: int):
    """Class-incremental benchmark: classes ``0 .. n_classes - 1`` in order, split evenly
    over ``n_experiences`` experiences (task label 0 everywhere)."""
    from avalanche.benchmarks import nc_benchmark

    return nc_benchmark(train, test, n_experiences=n_experiences, task_labels=False, seed=seed,
                        fixed_class_order=list(range(n_classes)))


def digits_benchmark(n_experiences: int = 5, seed: int = 0):
    """The bundled data as a class-incremental benchmark: scikit-learn's 8x8 digits
    (:func:`load_digits`: 1400 training and 397 test samples, ``x`` ``(64,)`` float32 in
    [0, 1]), classes 0-9 in order over ``n_experiences`` experiences (task label 0).

    The one builder of the digits benchmark: the main job, the examples, the notebook
    and the tests use it. The same ``seed`` gives the same split and order.
    """
    train, test, n_classes = load_digits(seed)
    return make_benchmark(train, test, n_classes, n_experiences, seed)
