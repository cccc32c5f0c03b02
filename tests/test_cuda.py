"""CUDA paths: storage on the GPU or on the host beside a GPU model, the worker's own
stream, several ranks sharing one GPU over a ``cuda:gloo`` group, and NCCL with one
rank. Skipped without a GPU (torch only: runs where Avalanche is not installed)."""

import pytest
import torch

from conftest import requires_cuda
from dist_harness import run_ranks

pytestmark = [requires_cuda, pytest.mark.timeout(300)]


def batches(n, device, seed=0, classes=5):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 3, 8, 8, generator=g)
        yield (x.to(device), torch.randint(0, classes, (16,), generator=g).to(device),
               torch.zeros(16, dtype=torch.long, device=device))


def run(storage_device, async_mode, exchange=None, stream=None, seed=0, steps=30):
    from avalanche_distributed_rehearsal.core import RehearsalPipeline, ShardedRehearsalBuffer

    buf = ShardedRehearsalBuffer(64, seed=1, device=storage_device, exchange=exchange)
    pipe = RehearsalPipeline(buf, 8, 8, async_mode=async_mode)
    outs = []
    with torch.cuda.stream(stream or torch.cuda.current_stream()):
        for b in batches(steps, "cuda", seed):
            x, y, t = pipe.augment(*b)
            outs.append((x.sum().item(), y.tolist(), t.tolist(), x.shape[0]))
    if async_mode:
        assert pipe.worker.stream is not None, "a side stream, CPU shards included"
    pipe.close()
    fields = {k: v.to("cpu", copy=True) for k, v in buf.local_tensors().items()}
    return outs, fields, buf


@pytest.mark.parametrize("storage_device", ["cuda", "cpu"])
def test_cuda_async_equals_sync(storage_device):
    a, fa, _ = run(storage_device, True)
    s, fs, _ = run(storage_device, False)
    assert a == s
    assert all(torch.equal(fa[k], fs[k]) for k in fa)
    assert a[-1][3] == 24


@pytest.mark.parametrize("storage_device", ["cuda", "cpu"])
def test_a_non_default_training_stream_gives_the_same_batches(storage_device):
    side = torch.cuda.Stream()
    a, fa, _ = run(storage_device, True, stream=side)
    s, fs, _ = run(storage_device, False)
    assert a == s and all(torch.equal(fa[k], fs[k]) for k in fa)


def test_cpu_shard_is_not_pinned_but_its_traffic_is_staged():
    from avalanche_distributed_rehearsal.core import ShardedRehearsalBuffer

    before = _host_allocated()
    buf = ShardedRehearsalBuffer(200_000, device="cpu")  # 200k x (3x8x8 float32 + 16) = 156 MB
    buf.insert(torch.randn(4, 3, 8, 8), torch.arange(4))
    assert not buf.storage.rows.is_pinned()
    if before is not None:
        assert _host_allocated() - before < 16 << 20, "the shard is not in the caching host allocator"
    _, _, small = run("cpu", True)
    staged = small.storage.staging._buffers
    assert staged and all(b.is_pinned() for b in staged.values())


def _host_allocated():
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        return None
    return stats().get("allocated_bytes.current", stats().get("allocated_bytes", None))


def shared_gpu(rank, world, async_mode, storage):
    """Two ranks on one GPU: CUDA (or CPU) shards, payload over a cuda:gloo group."""
    from avalanche_distributed_rehearsal.core import ProcessGroupExchange

    torch.cuda.set_device(0)
    exchange = ProcessGroupExchange(storage, payload_backend="cuda:gloo" if storage == "cuda" else None)
    outs, fields, buf = run(storage, async_mode, exchange=exchange, seed=rank)
    sources = buf.last_draw.table.stored.sum(1).tolist()
    buf.close()
    return outs, fields, sources


@pytest.mark.parametrize("storage", ["cuda", "cpu"])
def test_two_ranks_share_one_gpu_over_cuda_gloo(storage):
    a = run_ranks(shared_gpu, 2, True, storage, backend="cpu:gloo,cuda:gloo")
    s = run_ranks(shared_gpu, 2, False, storage, backend="cpu:gloo,cuda:gloo")
    for rank in range(2):
        assert a[rank][0] == s[rank][0]
        assert all(torch.equal(a[rank][1][k], s[rank][1][k]) for k in a[rank][1])
        assert all(n > 0 for n in a[rank][2]), "both shards hold samples"


def nccl_one_rank(rank, world, async_mode):
    from avalanche_distributed_rehearsal.core import ProcessGroupExchange

    exchange = ProcessGroupExchange("cuda")
    assert exchange.backend == "nccl" and exchange.device_payload
    outs, fields, buf = run("cuda", async_mode, exchange=exchange)
    buf.close()
    return outs, fields


def test_nccl_payload_with_one_rank():
    a = run_ranks(nccl_one_rank, 1, True, backend="nccl")[0]
    s = run_ranks(nccl_one_rank, 1, False, backend="nccl")[0]
    assert a[0] == s[0] and all(torch.equal(a[1][k], s[1][k]) for k in a[1])
