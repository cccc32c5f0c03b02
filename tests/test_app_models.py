"""The main job's networks: shapes, BatchNorm against GroupNorm, seeded weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from avalanche_distributed_rehearsal.app.models import build_model, image_shape


def _norms(model):
    return {type(m) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))}


@pytest.mark.parametrize("name, shape, norm", [
    ("cnn", (64,), nn.BatchNorm2d), ("cnn_gn", (64,), nn.GroupNorm),
    ("cnn", (3, 8, 8), nn.BatchNorm2d), ("resnet18", (3, 8, 8), nn.BatchNorm2d),
    ("resnet18_gn", (1, 8, 8), nn.GroupNorm), ("mlp", (64,), None)])
def test_models_give_logits_and_the_norm_they_name(name, shape, norm):
    model, again = build_model(name, shape, 10, seed=3), build_model(name, shape, 10, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert _norms(model) == ({norm} if norm else set())
    out = model(torch.rand(5, *shape))
    assert out.shape == (5, 10) and out.dtype == torch.float32


def test_batchnorm_uses_the_batch_statistics_groupnorm_does_not():
    """In training mode a BatchNorm net's output for a sample depends on the rest of the
    batch (per-rank statistics under DDP); a GroupNorm net's does not."""
    x = torch.rand(8, 64)
    other = torch.cat([x[:1], torch.rand(7, 64) * 3])
    for name, depends in (("cnn", True), ("cnn_gn", False)):
        model = build_model(name, (64,), 10).train()
        a, b = model(x)[0], model(other)[0]
        assert (not torch.allclose(a, b, atol=1e-5)) == depends, name


def test_image_shape():
    assert image_shape((64,)) == (1, 8, 8) and image_shape((3, 32, 32)) == (3, 32, 32)
    with pytest.raises(ValueError, match="square"):
        image_shape((10,))
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("vgg", (64,), 10)
