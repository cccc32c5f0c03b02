"""CUDA paths: storage on the GPU, the worker's own stream. Skipped without a GPU."""

import pytest
import torch

from conftest import requires_cuda

pytestmark = requires_cuda


def batches(n, device):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        x = torch.randn(16, 3, 8, 8, generator=g)
        yield x.to(device), torch.randint(0, 5, (16,), generator=g).to(device), torch.zeros(16, dtype=torch.long, device=device)


def run(storage_device, async_mode):
    from avalanche_distributed_rehearsal.core import RehearsalPipeline, ShardedRehearsalBuffer

    buf = ShardedRehearsalBuffer(64, seed=1, device=storage_device)
    pipe = RehearsalPipeline(buf, 8, 8, async_mode=async_mode)
    outs = [tuple(t.cpu() for t in pipe.augment(*b)) for b in batches(30, "cuda")]
    if async_mode:
        assert pipe.worker.stream is not None or storage_device == "cpu"
    pipe.close()
    return outs, {k: v.cpu() for k, v in buf.local_tensors().items()}


@pytest.mark.parametrize("storage_device", ["cuda", "cpu"])
def test_cuda_async_equals_sync(storage_device):
    a, fa = run(storage_device, True)
    s, fs = run(storage_device, False)
    for (xa, ya, ta), (xs, ys, ts) in zip(a, s):
        assert torch.equal(xa, xs) and torch.equal(ya, ys) and torch.equal(ta, ts)
    assert all(torch.equal(fa[k], fs[k]) for k in fa)
    assert a[-1][0].shape[0] == 24


def test_cpu_storage_is_pinned_when_cuda_exists():
    from avalanche_distributed_rehearsal.core import ShardedRehearsalBuffer

    buf = ShardedRehearsalBuffer(8, device="cpu")
    buf.insert(torch.randn(4, 3), torch.arange(4))
    assert buf.storage.rows.is_pinned()
