"""Retrieval encoders: timm backbone -> [1x1 projection] -> pooling -> [re-ID head] -> L2.

``create_encoder(spec)`` builds one from an :class:`EncoderSpec` (methods.md §1; AML, cirtorch,
D3still/ACD). The encoder carries its spec and its preprocessing, so the query and the gallery side
may run at different resolutions without calling code knowing.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asymret.errors import ConfigError
from asymret.retrieval import backbones  # noqa: F401  (registers the ResNet-IBN-a models in timm)
from asymret.retrieval.checkpoints import (  # noqa: F401  (UNREADABLE_CHECKPOINT: re-exported for pair.py)
    UNREADABLE_CHECKPOINT,
    as_backbone_state,
    first_difference,
    from_cirtorch,
    is_cirtorch,
    pretrained_file,
    read_checkpoint,
    unwrap_state_dict,
)
from asymret.retrieval.specs import EncoderSpec
from asymret.retrieval.transforms import build_transform

BNNECK_DIM = 512


def gem(x: Tensor, p: Tensor | float, eps: float = 1e-6) -> Tensor:
    """Generalized-mean pooling ``(mean_hw x^p)^(1/p)`` over a ``(B, C, H, W)`` map (Radenović et al.).

    Computed in at least float32: under bf16 autocast, x^3 of small activations would underflow.
    """
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling with exponent ``p`` (initialised at 3; learnable unless ``trainable=False``)."""

    def __init__(self, p: float = 3.0, trainable: bool = True, eps: float = 1e-6):
        super().__init__()
        p = torch.tensor(float(p))
        if trainable:
            self.p = nn.Parameter(p)
        else:
            self.register_buffer("p", p)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, trainable={isinstance(self.p, nn.Parameter)}"


def create_pool(spec: EncoderSpec) -> nn.Module:
    """``(B, C, H, W) -> (B, C)`` by ``spec.pooling``: gem, avg or max."""
    if spec.pooling == "gem":
        return GeM(spec.gem_p, spec.gem_trainable)
    pool = nn.AdaptiveAvgPool2d(1) if spec.pooling == "avg" else nn.AdaptiveMaxPool2d(1)
    return nn.Sequential(pool, nn.Flatten(1))


class BNNeck(nn.Module):
    """Re-ID head of D3still/ACD (methods.md §1).

    ``BN1d -> ReLU -> Linear(C -> 512, no bias) -> BN1d`` gives the retrieval feature; a bias-free
    ``Linear(512 -> num_classes)`` on it gives the identity logits used by CE and ACD.
    """

    def __init__(self, in_dim: int, num_classes: int | None = None, dim: int = BNNECK_DIM):
        super().__init__()
        self.neck = nn.Sequential(
            nn.BatchNorm1d(in_dim),
            nn.ReLU(inplace=True),
            nn.Linear(in_dim, dim, bias=False),
            nn.BatchNorm1d(dim),
        )
        self.classifier = nn.Linear(dim, num_classes, bias=False) if num_classes else None

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor | None]:
        feature = self.neck(pooled)
        return feature, self.classifier(feature) if self.classifier is not None else None


class TrainOutput(NamedTuple):
    """What training needs from one forward pass."""

    feature: Tensor  # (B, dim), L2-normalised: the retrieval embedding
    raw: Tensor  # (B, dim), the same before L2 (pooled feature, or the re-ID head's BN output)
    logits: Tensor | None  # (B, num_classes) with a bnneck head that has a classifier
    pooled: Tensor | None = None  # (B, C) the pooled map before the head: batch-hard triplet's input (re-ID)
    fmap: Tensor | None = None  # (B, C, h, w) the map that is pooled (UGD's gallery-side local features)
    stages: tuple[Tensor, ...] | None = None  # the backbone's last four stage maps, when asked for (UGD)


def grid_tokens(fmap: Tensor, grid: int) -> Tensor:
    """``(B, C, h, w) -> (B, grid², C)``: the map average-pooled to ``grid × grid`` cells, one token per cell in
    row-major order (UGD's local features; D3still code ``DownSampling_Pooling``)."""
    return F.adaptive_avg_pool2d(fmap, (grid, grid)).flatten(2).transpose(1, 2)


@contextmanager
def eval_mode(module: nn.Module):
    """Run ``module`` in eval mode and restore its previous mode after (BN must not update).

    A module already in eval mode throughout is left alone: ``eval()`` and ``train()`` each walk every
    submodule through ``__setattr__``, which for a MobileNetV2 cost more than a 80 px forward pass in the
    server's profile (benchmarks/bench_serve.py, docs/serve.md)."""
    if not any(m.training for m in module.modules()):
        yield module
        return
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def set_bn_eval(net: nn.Module) -> None:
    """Put every BatchNorm of ``net`` in eval mode (frozen statistics; AML's BatchNorm-eval training)."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class Encoder(nn.Module):
    """A retrieval encoder. ``forward`` gives L2-normalised ``(B, dim)`` embeddings.

    Attributes: ``spec`` (the :class:`EncoderSpec` that rebuilds it), ``dim`` (embedding size),
    ``transform`` (PIL image -> tensor, from ``spec.input``).
    """

    def __init__(self, spec: EncoderSpec, backbone: nn.Module):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self._output_fmt = getattr(backbone, "output_fmt", "NCHW")
        channels = backbone.num_features
        if spec.dim:
            self.projection = nn.Sequential(
                nn.Conv2d(channels, spec.dim, 1, bias=False), nn.ReLU(inplace=True)
            )
            channels = spec.dim
        else:
            self.projection = nn.Identity()
        self.pool = create_pool(spec)
        self.head = BNNeck(channels, spec.num_classes) if spec.head == "bnneck" else None
        # cirtorch's ``whiten``: Linear with bias on the L2-normalised pooled vector, then L2 again (Radenović et
        # al. TPAMI 2019, end-to-end whitening)
        self.fc = nn.Linear(channels, spec.fc_dim or channels) if spec.head == "fc" else None
        self.dim = BNNECK_DIM if self.head is not None else self.fc.out_features if self.fc is not None else channels
        self.transform = build_transform(spec.input)

    def feature_map(self, images: Tensor) -> Tensor:
        """The ``(B, C, H, W)`` map that is pooled: backbone features, projected if ``spec.dim``."""
        x = self.backbone.forward_features(images)
        if x.ndim == 3:  # token sequence (ViT): pool over the tokens
            x = x.transpose(1, 2).unsqueeze(-1)
        elif self._output_fmt == "NHWC":  # Swin and friends
            x = x.permute(0, 3, 1, 2)
        return self.projection(x)

    def forward_train(self, images: Tensor, stages: bool = False) -> TrainOutput:
        """One forward pass; ``stages=True`` also keeps the backbone's last four stage maps
        (:meth:`stage_modules`), captured by forward hooks on the same pass."""
        captured: dict[str, Tensor] = {}
        hooks = []
        if stages:
            for name in self.stage_modules():
                hooks.append(self.backbone.get_submodule(name).register_forward_hook(
                    lambda _m, _i, out, name=name: captured.__setitem__(name, out)))
        try:
            fmap = self.feature_map(images)
        finally:
            for hook in hooks:
                hook.remove()
        pooled = raw = self.pool(fmap)
        logits = None
        if self.head is not None:
            raw, logits = self.head(pooled)
        elif self.fc is not None:  # cirtorch ImageRetrievalNet.forward: l2n(whiten(l2n(pool(x))))
            raw = self.fc(F.normalize(pooled, dim=-1))
        kept = tuple(captured[name] for name in self.stage_modules()) if stages else None
        return TrainOutput(F.normalize(raw, dim=-1), raw, logits, pooled, fmap, kept)

    def stage_modules(self) -> list[str]:
        """Names (in ``backbone``) of the last four feature levels of timm's ``feature_info``: the four stages the
        D3still code calls ``feats`` (ResNet ``layer1``-``layer4``; MobileNetV3-Small 16, 24, 48, 576 channels)."""
        info = getattr(self.backbone, "feature_info", None)
        reductions = [level.get("reduction") for level in info[-4:]] if isinstance(info, list) else []
        # four stages that each downsample (a ViT's blocks all sit at stride 16, and emit tokens, not maps)
        if len(reductions) < 4 or self._output_fmt != "NCHW" or reductions != sorted(set(reductions)):
            raise ConfigError(f"backbone {self.spec.backbone} does not expose four convolutional feature stages "
                              "(timm feature_info); a loss that reads stage maps (ugd) needs a CNN such as a "
                              "ResNet or MobileNet")
        return [level["module"] for level in info[-4:]]

    def stage_channels(self) -> list[int]:
        """Channels of the four :meth:`stage_modules` maps."""
        self.stage_modules()
        return [level["num_chs"] for level in self.backbone.feature_info[-4:]]

    def local_features(self, fmap: Tensor, grid: int) -> Tensor:
        """``(B, grid², dim)``: the re-ID head's BN-neck applied to each cell of :func:`grid_tokens` (UGD's local
        features of the gallery network: the D3still code runs ``teacher.fc`` on the pooled cells)."""
        if self.head is None:
            raise ConfigError(f"local features need the re-ID head on {self.spec.backbone}; set head: bnneck")
        tokens = grid_tokens(fmap, grid)
        b, t, c = tokens.shape
        return self.head.neck(tokens.reshape(b * t, c)).reshape(b, t, -1)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_train(images).feature

    @property
    def multiscale_power(self) -> float:
        """Exponent of the power mean over scales: GeM's p (cirtorch ``msp``), else 1.

        With a bnneck or fc head features can be negative, and a fractional power of them is undefined
        (cirtorch likewise takes msp = 1 for networks with a whitening layer).
        """
        if self.spec.pooling == "gem" and self.spec.head == "none":
            return self.pool.p.item()
        return 1.0

    @torch.no_grad()
    def encode_batch(self, images: Tensor) -> Tensor:
        """Eval-mode embeddings of a preprocessed ``(B, 3, H, W)`` batch at every ``spec.input.scales``.

        Several scales are combined as the power mean ``(mean_s f_s^p)^(1/p)``, then L2
        (methods.md §1; cirtorch ``extract_ms``: each scale by bilinear resizing of the tensor).
        """
        scales = self.spec.input.scales
        with eval_mode(self):
            feats = [self(rescale(images, s, self.spec.input.interpolation)) for s in scales]
        if len(feats) == 1:
            return feats[0]
        p = self.multiscale_power
        return F.normalize(torch.stack(feats).pow(p).mean(0).pow(1.0 / p), dim=-1)

    def param_groups(self, lr: float, gem_lr_mult: float = 10.0, head_lr_mult: float = 1.0) -> list[dict]:
        """Optimizer groups: the backbone at ``lr``; the layers after it (projection, fc or bnneck head) at
        ``head_lr_mult`` x ``lr``; GeM's p at ``gem_lr_mult`` x ``lr`` without weight decay (AML's rule).

        A freshly initialised head on a pretrained backbone wants a larger rate than the backbone (fast-reid's
        ``HEADS_LR_FACTOR``). Other parameters take the optimizer's own weight decay; frozen ones are left out.
        """
        def trainable(module):
            return [p for p in module.parameters() if p.requires_grad]

        head = [p for m in (self.projection, self.head, self.fc) if m is not None for p in trainable(m)]
        pool = trainable(self.pool)
        if head_lr_mult == 1.0:
            head = []
        taken = {id(p) for p in head + pool}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in taken]
        groups = [{"params": rest, "lr": lr}, {"params": head, "lr": head_lr_mult * lr},
                  {"params": pool, "lr": gem_lr_mult * lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]


def rescale(images: Tensor, scale: float, mode: str = "bilinear") -> Tensor:
    """A batch resized by ``scale`` as cirtorch's multi-scale extraction does (no antialiasing)."""
    if scale == 1:
        return images
    return F.interpolate(images, scale_factor=scale, mode=mode, align_corners=False)


def create_encoder(spec: EncoderSpec | dict, *, load_weights: bool = True) -> Encoder:
    """Build the encoder ``spec`` describes.

    ``load_weights=False`` builds the architecture only, randomly initialised, without downloading
    (``pretrained``) or reading ``weights``: for callers that bring their own state dict (pair files).
    """
    spec = EncoderSpec.model_validate(spec)
    backbone = create_backbone(spec, pretrained=spec.pretrained and load_weights)
    encoder = Encoder(spec, backbone)
    if load_weights and spec.weights:
        load_weights_file(encoder, spec.weights)
    return encoder


def create_backbone(spec: EncoderSpec, pretrained: bool) -> nn.Module:
    """The timm model named by ``spec.backbone``, without its classifier.

    ``pretrained`` weights come from timm's cache without a network call when they are there, and a
    :class:`ConfigError` comes at once when they can only be downloaded and the network is off
    (:func:`~asymret.retrieval.checkpoints.pretrained_file`). With ``weights:`` set nothing is downloaded: the
    file replaces every backbone tensor anyway (loading is strict).
    """
    if not timm.is_model(spec.backbone):
        close = difflib.get_close_matches(spec.backbone, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"unknown timm backbone '{spec.backbone}'{hint}; pick a name from timm.list_models()"
        )
    pretrained = pretrained and not spec.weights
    cached = pretrained_file(spec.backbone) if pretrained else None
    try:
        backbone = timm.create_model(
            spec.backbone, pretrained=pretrained, num_classes=0, global_pool="",
            pretrained_cfg_overlay={"file": cached} if cached else None, **spec.backbone_kwargs
        )
    except TypeError as exc:
        raise ConfigError(f"backbone_kwargs do not fit {spec.backbone}: {exc}; fix backbone_kwargs") from None
    except OSError as exc:
        raise ConfigError(
            f"could not fetch pretrained weights for {spec.backbone} ({exc}); "
            "set pretrained: false and give weights: a local file"
        ) from None
    if hasattr(backbone, "pre_logits") and next(backbone.pre_logits.parameters(), None) is not None:
        # timm's VGG keeps fc6/fc7 as a conv head; the retrieval descriptor (cirtorch) is the conv map
        backbone.pre_logits = nn.Identity()
    features = getattr(backbone, "features", None)
    if isinstance(backbone, timm.models.vgg.VGG) and isinstance(features[-1], nn.MaxPool2d):
        # ... of conv5 after its ReLU, before pool5 (cirtorch init_network: ``vgg.features[:-1]``; AML's teachers)
        features[-1] = nn.Identity()
    if spec.last_stride == 1:
        set_last_stride_1(backbone, spec.backbone)
    return backbone


def set_last_stride_1(backbone: nn.Module, name: str = "backbone") -> None:
    """Re-ID convention (Luo et al. "bag of tricks"): layer4 keeps the resolution of layer3 (ResNets; for
    MobileNet/EfficientNet the last downsampling conv, as the ACD supplementary does for MobileNetV3-Small).

    Only the first block of layer4 downsamples: its strided conv and its downsample path (a strided
    1x1 conv, or an average pool in ResNet-D) become stride 1, doubling the final map's size.
    """
    layer4 = getattr(backbone, "layer4", None)
    if not isinstance(layer4, nn.Sequential):
        # MobileNet / EfficientNet (timm ``blocks``): the last downsampling conv, a depthwise one; timm pads
        # those convs symmetrically by (k - 1) // 2, which keeps the size at stride 1.
        blocks = getattr(backbone, "blocks", None)
        strided = [m for m in blocks.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)] \
            if isinstance(blocks, nn.Sequential) else []
        if not strided:
            raise ConfigError(f"last_stride: 1 needs a ResNet (layer4) or a MobileNet/EfficientNet (blocks) "
                              f"backbone; remove it for {name}")
        strided[-1].stride = (1, 1)
        return
    for module in layer4[0].modules():
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (1, 1)
        elif isinstance(module, nn.AvgPool2d) and module.stride in (2, (2, 2)):
            module.kernel_size, module.stride = 1, 1


def encoder_checkpoint(encoder: Encoder) -> dict:
    """``{"spec", "state_dict"}``: what rebuilds ``encoder`` (pair files; ``weights:`` files)."""
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    return {"spec": encoder.spec.model_dump(mode="json"), "state_dict": state}


def load_weights_file(encoder: Encoder, path: str | Path) -> None:
    """Load a local checkpoint into ``encoder``: a whole asymret encoder, a cirtorch network, or only a backbone.

    Accepted (docs/weights.md): an :func:`encoder_checkpoint` or an encoder state dict (keys ``backbone.*``); a
    cirtorch retrieval network (``meta`` + ``features.*``, :func:`~asymret.retrieval.checkpoints.from_cirtorch`);
    a timm/torchvision backbone state dict (classifier keys are dropped), optionally wrapped under ``state_dict``
    or ``model`` and with DDP's ``module.`` prefix. Keys must match exactly, or the tensors must have the
    backbone's shapes in its order (:func:`~asymret.retrieval.checkpoints.by_layout`). ``path`` may be a
    ``pkg:<distribution>/<file>`` reference to a file inside an installed package.
    """
    obj = read_checkpoint(path)
    backbone = None
    if is_cirtorch(obj):
        backbone, rest = from_cirtorch(obj, encoder, path)
        target, what = encoder, f"{encoder.spec.backbone} encoder (cirtorch network)"
        state = {**{f"backbone.{k}": v for k, v in backbone.items()}, **rest}
    else:
        state = _tensors_of(obj, path)
        if any(k.startswith("backbone.") for k in state):
            target, what = encoder, "asymret encoder"
        else:
            target, what = encoder.backbone, f"{encoder.spec.backbone} backbone"
            state = backbone = as_backbone_state(encoder.backbone, state)
    if problem := key_mismatch(target, state):
        order = "" if backbone is None else f"; by layout, {first_difference(encoder.backbone, backbone)}"
        raise ConfigError(
            f"weights file {path} does not fit the {what}: {problem}{order}; check that backbone, dim and head "
            "match it"
        )
    target.load_state_dict(state, strict=True)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint file, unwrapped; :class:`ConfigError` for anything else."""
    return _tensors_of(read_checkpoint(path), path)


def _tensors_of(obj, path) -> dict[str, Tensor]:
    state = unwrap_state_dict(obj)
    if state is None:
        raise ConfigError(f"weights file {path} holds no state dict of tensors; save model.state_dict()")
    return state


def key_mismatch(module: nn.Module, state: dict[str, Tensor]) -> str | None:
    """Why ``state`` does not fit ``module`` exactly (counts and an example of each), or None."""
    own = module.state_dict()
    # BatchNorm fills a missing num_batches_tracked itself (checkpoints from before torch 0.4.1 lack it)
    missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    parts = [
        f"{len(keys)} {label} (e.g. {keys[0]})"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    return ", ".join(parts) or None
