"""Checkpoints: bit-identical resume, elastic N -> M resume, atomic saves, bad checkpoints."""

import json
import os

import pytest
import torch

from dist_harness import run_ranks
from avalanche_distributed_rehearsal.core import RehearsalPipeline, ShardedRehearsalBuffer
from avalanche_distributed_rehearsal.core.checkpoint import (CheckpointError, load_buffer_checkpoint,
                                                             rank_file_name, save_buffer_checkpoint)


def rank_batch(rank, step, b=10):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn((b, 4), generator=g)
    x[:, 0] = torch.tensor([rank * 1_000_000 + step * b + j for j in range(b)], dtype=torch.float32)
    return x, torch.randint(0, 5, (b,), generator=g), torch.zeros(b, dtype=torch.int64)


def ids(buf):
    fields = buf.local_tensors()
    return fields["input"][:, 0].long().tolist() if fields else []


def resume_run(rank, world, path, async_mode, steps=24, cut=12, mem=40):
    """Outputs of an uninterrupted run and of a run saved at ``cut`` and resumed."""
    def make():
        buf = ShardedRehearsalBuffer(mem, seed=9, config={"batch_size_mem": 6})
        return buf, RehearsalPipeline(buf, 6, 5, async_mode=async_mode)

    buf, pipe = make()
    straight = [pipe.augment(*rank_batch(rank, i))[0] for i in range(steps)]
    pipe.close(); buf.close()

    buf, pipe = make()
    first = [pipe.augment(*rank_batch(rank, i))[0] for i in range(cut)]
    # the pipeline's state (step counter, the representatives prepared for the next step)
    # travels with the shard, one file per rank
    save_buffer_checkpoint(buf, path, step=cut, rank_files={"pipeline": pipe.state_dict()})
    pipe.close(); buf.close()

    buf, pipe = make()
    load_buffer_checkpoint(buf, path)
    with open(os.path.join(path, rank_file_name("pipeline", rank)), "rb") as f:
        pipe.load_state_dict(torch.load(f, weights_only=True))
    resumed = first + [pipe.augment(*rank_batch(rank, i))[0] for i in range(cut, steps)]
    pipe.close(); buf.close()
    return all(torch.equal(a, b) for a, b in zip(straight, resumed))


@pytest.mark.parametrize("async_mode", [True, False])
def test_same_world_resume_is_bit_identical_one_rank(tmp_path, async_mode):
    assert resume_run(0, 1, str(tmp_path / "ck"), async_mode)


@pytest.mark.timeout(180)
def test_same_world_resume_is_bit_identical_two_ranks(tmp_path):
    assert run_ranks(resume_run, 2, str(tmp_path / "ck"), True) == [True, True]


def fill_and_save(rank, world, path, mem):
    buf = ShardedRehearsalBuffer(mem, seed=3)
    for step in range(8):
        buf.insert(*rank_batch(rank, step))
    save_buffer_checkpoint(buf, path, step=8)
    out = ids(buf)
    buf.close()
    return out


def load_elsewhere(rank, world, path, mem):
    buf = ShardedRehearsalBuffer(mem, seed=3)
    load_buffer_checkpoint(buf, path)
    reps = buf.draw(4, 0)  # the loaded buffer is usable collectively
    out = {"ids": ids(buf), "counts": buf.class_counts(), "capacity": buf.local_capacity,
           "reps": len(reps["label"])}
    buf.close()
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("saved, loaded", [(2, 3), (4, 1), (1, 2), (3, 4)])
def test_elastic_resume_keeps_the_union(tmp_path, saved, loaded):
    path = str(tmp_path / "ck")
    mem = 60
    saved_ids = sum(run_ranks(fill_and_save, saved, path, mem), [])
    assert len(saved_ids) == min(mem, saved * 80)
    results = run_ranks(load_elsewhere, loaded, path, mem)
    loaded_ids = sum((r["ids"] for r in results), [])
    assert sorted(loaded_ids) == sorted(saved_ids), "no sample lost or duplicated"
    sizes = [len(r["ids"]) for r in results]
    assert max(sizes) - min(sizes) <= 1 and all(len(r["ids"]) <= r["capacity"] for r in results)
    assert all(r["reps"] == 4 for r in results)


def test_elastic_resume_to_a_smaller_budget_evicts_class_balanced(tmp_path):
    path = str(tmp_path / "ck")
    fill_and_save(0, 1, path, 60)
    buf = ShardedRehearsalBuffer(20, seed=3)
    load_buffer_checkpoint(buf, path)
    assert len(buf) == 20 and set(buf.class_counts().values()) == {4}


def saved_buffer(tmp_path):
    path = str(tmp_path / "ck")
    fill_and_save(0, 1, path, 30)
    return path


def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path):
    path = saved_buffer(tmp_path)
    before = ids(_loaded(path))
    os.makedirs(path + ".tmp", exist_ok=True)  # a save that died before its swap
    with open(os.path.join(path + ".tmp", "shard-00000.pt"), "wb") as f:
        f.write(b"partial")
    assert ids(_loaded(path)) == before
    os.replace(path, path + ".old")  # a save that died between its two renames
    assert ids(_loaded(path)) == before
    buf = _loaded(path)
    save_buffer_checkpoint(buf, path)  # the next save cleans up
    assert os.path.exists(path) and not os.path.exists(path + ".old")
    assert not os.path.exists(path + ".tmp")


def _loaded(path, **kwargs):
    buf = ShardedRehearsalBuffer(30, seed=3, **kwargs)
    load_buffer_checkpoint(buf, path)
    return buf


def _fresh_with_data(**kwargs):
    buf = ShardedRehearsalBuffer(30, **{"seed": 3, **kwargs})
    buf.insert(*rank_batch(5, 0))
    return buf


def _rejected_without_changes(buf, path, match):
    state = buf.state_dict()
    with pytest.raises(CheckpointError, match=match):
        load_buffer_checkpoint(buf, path)
    after = buf.state_dict()
    assert torch.equal(after["rows"], state["rows"]) and after["reservoir"] == state["reservoir"]


def test_truncated_checkpoint_is_rejected_without_changes(tmp_path):
    path = saved_buffer(tmp_path)
    shard = os.path.join(path, "shard-00000.pt")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    _rejected_without_changes(_fresh_with_data(), path, "truncated")


def test_checkpoint_of_another_version_is_rejected(tmp_path):
    path = saved_buffer(tmp_path)
    manifest_file = os.path.join(path, "manifest.json")
    manifest = json.load(open(manifest_file))
    manifest["version"] = 99
    json.dump(manifest, open(manifest_file, "w"))
    _rejected_without_changes(_fresh_with_data(), path, "version 99")


def test_checkpoint_of_another_configuration_is_rejected(tmp_path):
    path = saved_buffer(tmp_path)
    _rejected_without_changes(_fresh_with_data(seed=4, sampling="class_balanced"), path,
                              "sampling.*seed|seed.*sampling")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_buffer_checkpoint(ShardedRehearsalBuffer(10), str(tmp_path / "nothing"))
