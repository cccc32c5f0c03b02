"""The main job's batch transforms: uint8 conversion and per-row random shifts / flips."""

import pytest
import torch

from avalanche_distributed_rehearsal.app.augment import (BatchTransform, TransformedModel,
                                                         random_crop_flip, transforms_for)


def shifted(image, dy, dx):
    """``image`` (C, H, W) moved down by ``dy`` and right by ``dx`` pixels, zero fill."""
    out = torch.zeros_like(image)
    _, h, w = image.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[:, yd, xd] = image[:, ys, xs]
    return out


def test_every_row_gets_its_own_shift_within_the_padding():
    torch.manual_seed(0)
    images = torch.rand(64, 3, 6, 6) + 0.1  # no zero pixel: a shift is visible
    out = random_crop_flip(images, padding=2, flip=False)
    assert out.shape == images.shape and out.dtype == images.dtype
    found = set()
    for image, got in zip(images, out):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(got, shifted(image, dy, dx))]
        assert len(matches) == 1
        found.add(matches[0])
    assert len(found) > 10  # rows drew different shifts
    assert torch.equal(images, images.clone())  # the input is untouched


def test_flips_are_per_row_and_the_crop_keeps_a_padding_of_zero_intact():
    torch.manual_seed(1)
    images = torch.rand(40, 1, 4, 5)
    out = random_crop_flip(images, padding=0, flip=True)
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)
    assert out is not images


def test_batch_transform_converts_uint8_and_augments_digits_as_8x8_images():
    x = torch.randint(0, 17, (32, 64), dtype=torch.uint8)
    convert = BatchTransform(16)
    assert torch.equal(convert(x), x.float() / 16)  # exactly the float32 data set's values
    train, evaluation = transforms_for("digits", (64,), augment=True, integer_pixels=True)
    assert (train.image_shape, train.padding, train.flip) == ((1, 8, 8), 1, False)
    assert torch.equal(evaluation(x), x.float() / 16)  # evaluation converts, never augments
    torch.manual_seed(0)
    a = train(x)
    torch.manual_seed(0)
    assert torch.equal(a, train(x))  # torch's generator: reproducible
    assert a.shape == (32, 64) and a.dtype == torch.float32 and not torch.equal(a, x.float() / 16)
    for row, got in zip(x.float() / 16, a):
        image = row.reshape(1, 8, 8)
        assert any(torch.equal(got.reshape(1, 8, 8), shifted(image, dy, dx))
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def test_transforms_for_each_data_set():
    assert transforms_for("digits", (64,), augment=False, integer_pixels=False) == (None, None)
    train, evaluation = transforms_for("cifar10", (3, 32, 32), augment=True, integer_pixels=True)
    assert (train.image_shape, train.padding, train.flip, train.pixel_max) == ((3, 32, 32), 4, True, 255)
    assert not evaluation.augments
    train, evaluation = transforms_for("synthetic", (3, 16, 16), augment=True, integer_pixels=False)
    assert (train.padding, train.flip, evaluation) == (2, True, None)
    with pytest.raises(ValueError, match="--augment needs image data"):
        transforms_for("synthetic", (64,), augment=True, integer_pixels=False)


def test_transformed_model_augments_in_training_and_converts_in_evaluation():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return x.sum(1, keepdim=True)

    model = TransformedModel(Spy(), lambda x: x.float() + 100, lambda x: x.float())
    x = torch.ones(2, 3, dtype=torch.uint8)
    model.train()(x)
    model.eval()(x)
    assert torch.equal(seen[0], x.float() + 100) and torch.equal(seen[1], x.float())
    assert list(TransformedModel(torch.nn.Linear(2, 2)).state_dict()) == ["model.weight", "model.bias"]
