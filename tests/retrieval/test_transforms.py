"""Training-time transforms: the test transform when augmentation is off, one fixed size when it is on."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from asymret.retrieval.specs import InputSpec
from asymret.retrieval.transforms import AugmentSpec, build_train_transform, build_transform, train_size
from asymret.training.config import DataConfig


def image(w: int, h: int) -> Image.Image:
    ramp = torch.linspace(0, 255, w * h * 3).reshape(h, w, 3).to(torch.uint8).numpy()
    return Image.fromarray(ramp)


def test_off_is_exactly_the_test_transform():
    spec = InputSpec(size=40)
    img = image(60, 30)
    for augment in (None, AugmentSpec()):
        assert torch.equal(build_train_transform(spec, augment)(img), build_transform(spec)(img))
    assert build_train_transform(spec, None)(img).shape == (3, 20, 40)  # longer side kept


@pytest.mark.parametrize("size, expected", [(24, (24, 24)), ((16, 32), (16, 32))])
def test_on_gives_one_fixed_size_for_any_image_shape(size, expected):
    spec = InputSpec(size=size)
    transform = build_train_transform(spec, AugmentSpec(enabled=True))
    assert train_size(spec, AugmentSpec(enabled=True)) == expected
    shapes = {tuple(transform(image(w, h)).shape) for w, h in [(60, 30), (30, 60), (45, 45)]}
    assert shapes == {(3, *expected)}
    assert train_size(spec, AugmentSpec(enabled=True, size=(12, 20))) == (12, 20)


def test_on_is_random_and_follows_the_torch_seed():
    transform = build_train_transform(InputSpec(size=24), AugmentSpec(enabled=True))
    img = image(50, 40)
    torch.manual_seed(0)
    a, b = transform(img), transform(img)
    torch.manual_seed(0)
    assert not torch.equal(a, b) and torch.equal(transform(img), a)


def test_colour_only_augmentation_keeps_the_image_geometry():
    spec = InputSpec(size=(20, 20))
    augment = AugmentSpec(enabled=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, brightness=0.0,
                          contrast=0.0, saturation=0.0, hue=0.0, grayscale=1.0)
    out = build_train_transform(spec, augment)(image(20, 20))
    grey = out * torch.tensor(spec.std)[:, None, None] + torch.tensor(spec.mean)[:, None, None]
    assert torch.allclose(grey[0], grey[1], atol=1e-5) and torch.allclose(grey[1], grey[2], atol=1e-5)


def test_config_section_is_off_by_default_and_validated():
    assert DataConfig().augment.enabled is False
    cfg = DataConfig.model_validate({"augment": {"enabled": True, "hue": 0.1}})
    assert cfg.augment.enabled and cfg.augment.hue == 0.1
    with pytest.raises(ValidationError, match="scale"):
        DataConfig.model_validate({"augment": {"scale": [0.9, 0.5]}})
    with pytest.raises(ValidationError):
        DataConfig.model_validate({"augment": {"hue": 0.7}})  # torchvision's limit is 0.5
    with pytest.raises(ValidationError):
        DataConfig.model_validate({"augment": {"jitter": 0.3}})  # unknown keys are errors
