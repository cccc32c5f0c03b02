"""Synthetic data, models and Avalanche strategies shared by the strategy-level benchmarks.

Imports Avalanche lazily (inside functions), so the torch-only benchmarks never pay for it.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

VARIANTS = ("incremental_b", "incremental_b+r", "stock_replay", "ours_sync", "ours_async",
            "ours_auto", "ours_sync_again")
VARIANT_TITLES = {
    "incremental_b": "(a) incremental, batch b",
    "incremental_b+r": "(b) incremental, batch b + r",
    "stock_replay": "(c) stock ReplayPlugin + ClassBalancedBuffer",
    "ours_sync": "(d) ours, synchronous",
    "ours_async": "(e) ours, asynchronous (always the worker)",
    "ours_auto": "(f) ours, auto (the default: worker or inline, measured)",
    "ours_sync_again": "(g) ours, synchronous again (as (d): the run's noise between two "
                       "identical variants)",
}


def make_model(kind: str, shape: Sequence[int], classes: int) -> nn.Module:
    """``"mlp"``: a light 2-layer perceptron; ``"resnet18"`` / ``"resnet50"``: torchvision's
    (compute-bound)."""
    torch.manual_seed(0)
    if kind == "mlp":
        n = 1
        for s in shape:
            n *= s
        return nn.Sequential(nn.Flatten(), nn.Linear(n, 128), nn.ReLU(), nn.Linear(128, classes))
    if kind in ("resnet18", "resnet50"):
        import torchvision

        return getattr(torchvision.models, kind)(num_classes=classes)
    raise ValueError(f"model kind must be 'mlp', 'resnet18' or 'resnet50', got {kind!r}")


def tensor_dataset(n: int, shape: Sequence[int], classes: int, seed: int,
                   dtype: torch.dtype = torch.float32):
    """A ``TensorDataset`` of ``n`` random samples with a ``.targets`` list (classes cycle)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    else:
        x = torch.randn((n, *shape), generator=g).to(dtype)
    y = torch.arange(n) % classes
    ds = torch.utils.data.TensorDataset(x, y)
    ds.targets = y.tolist()
    return ds


def class_incremental(n_per_exp: int, n_exp: int, shape: Sequence[int], classes: int,
                      seed: int = 0):
    """An Avalanche class-incremental benchmark: ``n_exp`` experiences of ``n_per_exp`` samples."""
    from avalanche.benchmarks import nc_benchmark

    ds = tensor_dataset(n_per_exp * n_exp, shape, classes, seed)
    return nc_benchmark(train_dataset=ds, test_dataset=ds, n_experiences=n_exp,
                        task_labels=False, shuffle=False, seed=seed)


def make_strategy(variant: str, model: nn.Module, b: int, r: int, c: int, mem_size: int,
                  device, plugins_before: List = (), plugins_after: List = (), seed: int = 0):
    """An Avalanche ``Naive`` strategy for one of :data:`VARIANTS` (SGD, cross-entropy, no logging).

    The model is deep-copied, so every variant starts from the same weights. Under
    ``torch.distributed`` it is wrapped in ``DistributedDataParallel``.
    """
    import torch.distributed as dist
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
    from avalanche.training.storage_policy import ClassBalancedBuffer

    from avalanche_distributed_rehearsal import DistributedReplayPlugin

    model = copy.deepcopy(model).to(device)
    if dist.is_available() and dist.is_initialized():
        device_ids = [torch.device(device)] if torch.device(device).type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    plugins = list(plugins_before)
    mb = b
    if variant == "incremental_b+r":
        mb = b + r
    elif variant == "stock_replay":
        plugins.append(ReplayPlugin(mem_size=mem_size, batch_size_mem=r,
                                    storage_policy=ClassBalancedBuffer(max_size=mem_size,
                                                                       adaptive_size=True)))
    elif variant in ("ours_sync", "ours_async", "ours_auto", "ours_sync_again"):
        plugins.append(DistributedReplayPlugin(mem_size=mem_size, batch_size_mem=r,
                                               num_candidates=c, seed=seed,
                                               async_mode={"ours_sync": False,
                                                           "ours_async": True,
                                                           "ours_auto": "auto",
                                                           "ours_sync_again": False}[variant]))
    elif variant != "incremental_b":
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    plugins.extend(plugins_after)
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                 criterion=nn.CrossEntropyLoss(), train_mb_size=mb, train_epochs=1,
                 eval_mb_size=mb, device=device, plugins=plugins,
                 evaluator=EvaluationPlugin(loggers=[]), eval_every=-1)


def auto_choices(strategy) -> Optional[Dict]:
    """What our plugin's ``async_mode="auto"`` chose so far (the same on every rank):
    ``{"choices", "early_ends", "chosen", "held"}``, or None without a chooser."""
    for p in strategy.plugins:
        if type(p).__name__ != "DistributedReplayPlugin":
            continue
        summary = chooser_summary(getattr(p.pipeline, "chooser", None))
        if summary is not None:
            return summary
    return None


def chooser_summary(chooser) -> Optional[Dict]:
    """``{"choices", "early_ends", "chosen", "held"}`` of a pipeline's ``OverlapChooser``
    (``async_mode="auto"``), or None without one."""
    if chooser is None:
        return None
    return {"choices": chooser.choices, "early_ends": chooser.early_ends,
            "chosen": chooser.chosen, "held": chooser.held}


def close_strategy(strategy) -> None:
    """Stop our plugin's worker and release its process group (no-op for the others)."""
    for p in strategy.plugins:
        close = getattr(p, "close", None)
        if close is not None and type(p).__name__ == "DistributedReplayPlugin":
            close()
