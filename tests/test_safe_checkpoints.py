"""Checkpoint files never run code: crafted shards, training.pt and rng files are refused."""

import json
import os

import numpy as np
import pytest
import torch

from avalanche_distributed_rehearsal.core import ShardedRehearsalBuffer
from avalanche_distributed_rehearsal.core.checkpoint import (CheckpointError, load_buffer_checkpoint,
                                                             safe_load, save_buffer_checkpoint)


class CreatesAFile:
    """Unpickling it calls ``open(path, "w")``: the file appears if the loader runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def plant(file, obj, manifest_dir=None):
    """Replace ``file`` with ``torch.save(obj)``; fix the manifest's byte count for it."""
    torch.save(obj, file)
    if manifest_dir is not None:
        manifest_file = os.path.join(manifest_dir, "manifest.json")
        manifest = json.load(open(manifest_file))
        for entry in manifest["shards"]:
            if entry["file"] == os.path.basename(file):
                entry["bytes"] = os.path.getsize(file)
        json.dump(manifest, open(manifest_file, "w"))


def test_the_crafted_object_runs_code_when_loaded_unsafely(tmp_path):
    """The payload of the tests below is real: an unsafe load creates the file."""
    marker = tmp_path / "created"
    torch.save({"rows": CreatesAFile(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)["rows"].close()
    assert marker.exists()


def saved_buffer(path):
    buf = ShardedRehearsalBuffer(20, seed=1)
    buf.insert(torch.randn(10, 3), torch.arange(10) % 2)
    save_buffer_checkpoint(buf, path, step=3)
    rows = buf.state_dict()["rows"]
    buf.close()
    return rows


def test_a_shard_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    path = str(tmp_path / "ck")
    saved_buffer(path)
    marker = tmp_path / "created"
    state = torch.load(os.path.join(path, "shard-00000.pt"), weights_only=True)
    state["reservoir"] = CreatesAFile(marker)  # a real shard with one crafted entry
    plant(os.path.join(path, "shard-00000.pt"), state, manifest_dir=path)
    buf = ShardedRehearsalBuffer(20, seed=1)
    buf.insert(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    before = buf.state_dict()
    with pytest.raises(CheckpointError, match=r"shard-00000\.pt: refused.*could run code"):
        load_buffer_checkpoint(buf, path)
    assert not marker.exists()
    after = buf.state_dict()
    assert torch.equal(after["rows"], before["rows"]) and after["reservoir"] == before["reservoir"]
    buf.close()


def test_elastic_loads_refuse_crafted_shards_too(tmp_path):
    path = str(tmp_path / "ck")
    saved_buffer(path)
    marker = tmp_path / "created"
    plant(os.path.join(path, "shard-00000.pt"), CreatesAFile(marker), manifest_dir=path)
    buf = ShardedRehearsalBuffer(30, seed=1)  # another budget: the union path
    with pytest.raises(CheckpointError, match="refused"):
        load_buffer_checkpoint(buf, path)
    assert not marker.exists()
    buf.close()


def test_genuine_shards_load_with_plain_data_of_any_shape(tmp_path):
    """The loader is generic: any mix of dicts, lists, ints, strings and CPU tensors loads."""
    rows = saved_buffer(str(tmp_path / "ck"))
    buf = ShardedRehearsalBuffer(20, seed=1)
    load_buffer_checkpoint(buf, str(tmp_path / "ck"))
    assert torch.equal(buf.state_dict()["rows"], rows)
    buf.close()
    plain = {"a": [1, 2, {"b": (3, "x", None, 2.5, True)}], "t": torch.arange(5),
             "nested": {7: torch.zeros(2, 2, dtype=torch.int64)}}
    torch.save(plain, tmp_path / "plain.pt")
    loaded = safe_load(str(tmp_path / "plain.pt"))
    assert loaded["a"] == plain["a"] and torch.equal(loaded["t"], plain["t"])
    assert torch.equal(loaded["nested"][7], plain["nested"][7])


# ---------------------------------------------------------------- training checkpoints
avalanche = pytest.importorskip("avalanche")


def training_run(path):
    from avalanche.training import Naive

    from avalanche_distributed_rehearsal import DistributedReplayPlugin
    from avalanche_distributed_rehearsal.integration.checkpoint import save_training_checkpoint

    x = torch.randn(40, 4)
    y = torch.arange(40) % 2
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    plugin = DistributedReplayPlugin(mem_size=10, batch_size_mem=2)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     train_mb_size=8, plugins=[plugin], evaluator=None)
    from avalanche.benchmarks import nc_benchmark
    from torch.utils.data import TensorDataset

    data = TensorDataset(x, y)
    data.targets = y.tolist()
    bench = nc_benchmark(data, data, n_experiences=1, task_labels=False, seed=0)
    strategy.train(bench.train_stream[0])
    save_training_checkpoint(path, strategy, plugin, extra={"next": 1})
    return strategy, plugin


@pytest.mark.parametrize("file", ["training.pt", "rng-00000.pt"])
def test_training_checkpoint_files_that_would_run_code_are_refused(tmp_path, file):
    from avalanche_distributed_rehearsal.integration.checkpoint import load_training_checkpoint

    path = str(tmp_path / "run")
    strategy, plugin = training_run(path)
    marker = tmp_path / "created"
    target = os.path.join(path, file)
    genuine = torch.load(target, weights_only=False)  # our own file, to craft a variant
    if file == "training.pt":
        genuine["clock"] = CreatesAFile(marker)
    else:  # an object array inside the NumPy state: NumPy's allowed names do not let it in
        genuine["numpy"] = np.array([CreatesAFile(marker)], dtype=object)
    plant(target, genuine)
    weights = [p.detach().clone() for p in strategy.model.parameters()]
    with pytest.raises(CheckpointError, match=rf"{file.replace('.', '[.]')}: refused"):
        load_training_checkpoint(path, strategy, plugin)
    assert not marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(weights, strategy.model.parameters()))
    plugin.close()


def test_genuine_training_checkpoints_still_load(tmp_path):
    from avalanche_distributed_rehearsal.integration.checkpoint import load_training_checkpoint

    path = str(tmp_path / "run")
    strategy, plugin = training_run(path)
    state = np.random.get_state()
    np.random.seed(5)
    assert load_training_checkpoint(path, strategy, plugin) == {"next": 1}
    restored = np.random.get_state()
    assert np.array_equal(restored[1], state[1]) and restored[2:] == state[2:]
    plugin.close()
