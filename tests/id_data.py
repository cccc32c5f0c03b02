"""A small class-incremental benchmark whose inputs carry a unique sample id in column 0
(the rest: class signal and noise), for tests that follow samples through the buffer."""

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

CLASSES, DIM = 6, 5


def id_benchmark(n=240, seed=0):
    """``(benchmark, x)``: 3 experiences of 2 classes over ``n`` samples ``x`` ``(n, DIM)``
    float32, ``x[:, 0]`` the sample id; the test stream is the first 60 samples."""
    from avalanche.benchmarks import nc_benchmark

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = torch.randn(n, DIM, generator=g) * 0.3
    x[:, 1:] += F.one_hot(y, CLASSES)[:, : DIM - 1].float()
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    train, test = TensorDataset(x, y), TensorDataset(x[:60], y[:60])
    train.targets, test.targets = y.tolist(), y[:60].tolist()
    return nc_benchmark(train, test, n_experiences=3, task_labels=False, seed=0,
                        fixed_class_order=list(range(CLASSES))), x
