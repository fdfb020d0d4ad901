"""What an encoder is, as data: the spec that travels with its weights (configs, pair files, API).

An encoder knows its own input spec (resolution, mean/std, scales), so asymmetric resolution is
never a special case in calling code: each side preprocesses with its own ``InputSpec``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a config must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputSpec(Strict):
    """How images are prepared for one encoder.

    ``size`` is either one int, the longer side (retrieval convention: aspect kept, cirtorch's
    ``imsize``), or ``[height, width]`` (re-ID convention: fixed size).
    """

    size: int | tuple[int, int] = 362
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    scales: tuple[float, ...] = (1.0,)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"

    @field_validator("size")
    @classmethod
    def _positive(cls, v):
        sizes = (v,) if isinstance(v, int) else v
        if any(s < 8 for s in sizes):
            raise ValueError("image size must be at least 8 pixels")
        return v

    @field_validator("scales")
    @classmethod
    def _scales(cls, v):
        if not v or any(s <= 0 for s in v):
            raise ValueError("scales must be a non-empty list of positive factors, e.g. [1, 0.7071, 0.5]")
        return v


MULTISCALE = (1.0, 2 ** -0.5, 0.5)


class EncoderSpec(Strict):
    """A retrieval encoder: timm backbone -> [1x1 projection] -> pooling -> [head] -> L2."""

    backbone: str = Field("resnet18", description="any timm model name (timm.list_models())")
    pretrained: bool = Field(False, description="download timm's pretrained weights (needs internet)")
    weights: str | None = Field(None, description="local checkpoint for the backbone or the whole encoder")
    backbone_kwargs: dict = Field(default_factory=dict, description="extra keyword arguments for timm")
    last_stride: Literal[1, 2] | None = Field(None, description="1 for the re-ID convention on ResNets")
    pooling: Literal["gem", "avg", "max"] = "gem"
    gem_p: float = Field(3.0, gt=0)
    gem_trainable: bool = True
    dim: int | None = Field(None, gt=0, description="1x1 conv (no bias) + ReLU to this dimension")
    head: Literal["none", "bnneck", "fc"] = Field(
        "none", description="bnneck: the re-ID head of D3still/ACD; fc: a Linear layer with bias on the L2-normalised "
        "pooled vector (cirtorch's end-to-end whitening layer ``whiten``; a fresh one starts an unaligned space)")
    fc_dim: int | None = Field(None, gt=0, description="head: fc: its output size (default: its input size)")
    num_classes: int | None = Field(None, gt=0, description="identity classifier size for the re-ID head")
    # Not read: kept so that specs written by earlier versions (pair files, weights files) still load. A
    # network's post-processing whitening is learned per pair (training's whitening: section, asymret
    # whiten) and stored in the pair file beside the spec (asymret.retrieval.pair).
    whitening: Literal["none", "learned", "pca"] = Field("none", description="not read; see whitening: in the "
                                                         "experiment config")
    whitening_dim: int | None = Field(None, gt=0, description="not read; see whitening.dim")
    input: InputSpec = Field(default_factory=InputSpec)
