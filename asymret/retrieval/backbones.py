"""ResNet-IBN-a backbones, registered in timm so ``timm.create_model("resnet101_ibn_a")`` builds them.

IBN-Net (Pan et al., "Two at Once: Enhancing Learning and Generalization Capacities via IBN-Net",
ECCV 2018), variant a, as XingangPan/IBN-Net and fast-reid build it: in every residual block of
``layer1``-``layer3`` the normalisation after the first conv is an :class:`IBN` layer, instance norm
on the first half of the channels and batch norm on the rest; the stem and ``layer4`` keep batch norm.
Instance norm removes per-image appearance (colour, contrast) early on while batch norm keeps the
content, which is why re-ID galleries (ACD's ResNet101-IBN) use it.

Module names follow IBN-Net's release (``layer1.0.bn1.IN.weight``, ``fc.weight``), so its ImageNet
checkpoints load as a local ``weights:`` file. timm hosts no IBN-a weights and asymret never downloads
at run time, so ``pretrained=True`` only works with a local file
(``pretrained_cfg_overlay={"file": path}``).
"""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import Tensor, nn

from asymret.errors import ConfigError

IBN_STAGES = ("layer1", "layer2", "layer3")


class IBN(nn.Module):
    """Instance-batch normalisation: ``IN`` on the first ``int(ratio · C)`` channels, ``BN`` on the rest."""

    def __init__(self, planes: int, ratio: float = 0.5):
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: Tensor) -> Tensor:
        instance, batch = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(instance.contiguous()), self.BN(batch.contiguous())], dim=1)


class ResNetIBNa(ResNet):
    """timm's :class:`ResNet` with the ``bn1`` of every block in ``layer1``-``layer3`` made :class:`IBN`.

    Everything else (stem, downsampling, ``last_stride``, ``forward_features``, feature extraction) is
    timm's, so the rest of asymret treats it as any ResNet.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for stage in IBN_STAGES:
            for block in getattr(self, stage):
                block.bn1 = IBN(block.bn1.num_features)


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "conv1", "classifier": "fc",
        "origin_url": "https://github.com/XingangPan/IBN-Net", "paper_ids": "arXiv:1807.09441", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    name: _cfg() for name in ("resnet18_ibn_a", "resnet34_ibn_a", "resnet50_ibn_a", "resnet101_ibn_a")
})


def _create_resnet_ibn_a(variant: str, pretrained: bool, **kwargs) -> ResNetIBNa:
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                     pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
        if not (cfg.file or cfg.state_dict):
            raise ConfigError(
                f"timm has no pretrained weights for {variant} and asymret downloads none; set pretrained: "
                f"false and give weights: a local checkpoint (e.g. IBN-Net's {variant} ImageNet release)"
            )
    return build_model_with_cfg(ResNetIBNa, variant, pretrained, **kwargs)


@register_model
def resnet18_ibn_a(pretrained: bool = False, **kwargs) -> ResNetIBNa:
    """ResNet-18-IBN-a (BasicBlock, layers 2-2-2-2)."""
    return _create_resnet_ibn_a("resnet18_ibn_a", pretrained, block=BasicBlock, layers=(2, 2, 2, 2), **kwargs)


@register_model
def resnet34_ibn_a(pretrained: bool = False, **kwargs) -> ResNetIBNa:
    """ResNet-34-IBN-a (BasicBlock, layers 3-4-6-3)."""
    return _create_resnet_ibn_a("resnet34_ibn_a", pretrained, block=BasicBlock, layers=(3, 4, 6, 3), **kwargs)


@register_model
def resnet50_ibn_a(pretrained: bool = False, **kwargs) -> ResNetIBNa:
    """ResNet-50-IBN-a (Bottleneck, layers 3-4-6-3)."""
    return _create_resnet_ibn_a("resnet50_ibn_a", pretrained, block=Bottleneck, layers=(3, 4, 6, 3), **kwargs)


@register_model
def resnet101_ibn_a(pretrained: bool = False, **kwargs) -> ResNetIBNa:
    """ResNet-101-IBN-a (Bottleneck, layers 3-4-23-3): the ACD re-ID gallery."""
    return _create_resnet_ibn_a("resnet101_ibn_a", pretrained, block=Bottleneck, layers=(3, 4, 23, 3), **kwargs)
