"""RAHO: resolution-aware learning rates for the co-trained gallery network (ACD, Eq. 12-13; methods.md §4).

Measured once before ACD training, without gradients, gallery network in eval mode. For each residual
block b, ``h_b`` is the L2-normalised global average of its output over a batch, and

    d_b = mean_i ‖S_i − (H_b H_bᵀ)_i‖₂            (Eq. 12)

says how far the batch's relations at block b are from a reference ``S``. A block's score
``s_b = d_{b−1} − d_b`` is how much it brings the relations closer to the reference; scores are
averaged over batches and renormalised inside each stage as ``n_stage · softmax_stage(s)``, so stages
of 3 and of 23 blocks compete on the same scale. ``d_0`` is measured on the input of the first block
(the stem's output), so every block, the first included, gets a score (the ACD code scores blocks
from the second on, and never selects ``layer1.0``).

Two branches:

- high resolution: gallery images at gallery resolution, reference ``S = ĜĜᵀ`` from the gallery
  network's own final embedding;
- cross resolution: the same images at query resolution through the gallery network, only the samples
  its classifier gets right, reference the frozen query network's ``Q̂Q̂ᵀ`` on those images.

``U_hr`` and ``U_cr`` are the ``int(p · n)`` blocks (p = 30 %) with the lowest renormalised score in each
branch. Learning rates (Eq. 13), γ = 0.05: blocks in ``U_hr ∩ U_cr`` get η (free to move toward the
query network), ``U_hr \\ U_cr`` get γη, everything else (the important blocks, stem, projection,
pooling, head, classifier) γ²η, which keeps the gallery's own space (SIR) intact.

Blocks are found by name (:func:`residual_blocks`): ``layer1``-``layer4`` of ResNets (timm, IBN-a);
``stages[i].blocks`` (ConvNeXt) and ``layers[i].blocks`` (Swin), one stage each; ``blocks[i]`` of
EfficientNet/MobileNet, one stage each; a flat ``blocks`` (ViT) as one stage. The cross-resolution
branch runs for ResNet-family galleries only (a Swin gallery has a fixed input size); without it
``U_cr`` is empty, so ``U_hr`` gets γη and nothing gets η, as the ACD code does for its Swin gallery.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asymret.errors import ConfigError, DataError
from asymret.retrieval.encoders import eval_mode

log = logging.getLogger(__name__)

SOURCE = "ACD (Xie et al.), Eq. 12-13; methods.md §4"
TIER_NAMES = ("eta", "gamma*eta", "gamma^2*eta")


class Block(NamedTuple):
    name: str  # path inside the backbone, e.g. "layer3.7" or "layers.2.blocks.5"
    stage: str  # the container whose blocks are renormalised together, e.g. "layer3"
    module: nn.Module


# ------------------------------------------------------------------------------------------- blocks


def resnet_family(backbone: nn.Module) -> bool:
    return all(isinstance(getattr(backbone, f"layer{i}", None), nn.Sequential) for i in range(1, 5))


def _stages(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    if resnet_family(backbone):
        return [(f"layer{i}", getattr(backbone, f"layer{i}")) for i in range(1, 5)]
    containers = (nn.Sequential, nn.ModuleList)
    for attr in ("stages", "layers"):  # ConvNeXt, Swin: each stage holds its .blocks
        stages = getattr(backbone, attr, None)
        if isinstance(stages, containers) and all(isinstance(getattr(s, "blocks", None), containers)
                                                  for s in stages):
            return [(f"{attr}.{i}.blocks", s.blocks) for i, s in enumerate(stages)]
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, containers):
        if all(isinstance(b, nn.Sequential) for b in blocks):  # EfficientNet, MobileNet
            return [(f"blocks.{i}", s) for i, s in enumerate(blocks)]
        return [("blocks", blocks)]  # ViT
    return []


def residual_blocks(backbone: nn.Module) -> list[Block]:
    """The backbone's blocks in forward order, each with its stage (see the module docstring)."""
    blocks = [Block(f"{stage}.{j}", stage, m) for stage, seq in _stages(backbone) for j, m in enumerate(seq)]
    if not blocks:
        raise ConfigError(
            f"RAHO finds no residual blocks in {type(backbone).__name__} (it looks for layer1-layer4, "
            "stages[i].blocks, layers[i].blocks or blocks); use a ResNet, ConvNeXt, Swin, EfficientNet or "
            "ViT gallery, or train without raho"
        )
    return blocks


def pooled(x: Tensor, channels_last: bool) -> Tensor:
    """Global average of a block output as ``(B, C)`` float32: NCHW, NHWC (Swin) or tokens (ViT)."""
    x = x.float()
    if x.ndim == 4:
        return x.mean((1, 2)) if channels_last else x.mean((2, 3))
    return x.mean(1) if x.ndim == 3 else x


@contextmanager
def recording(blocks: list[Block], channels_last: bool) -> Iterator[dict[int, Tensor]]:
    """While active, ``record[0]`` is the pooled input of the first block, ``record[b]`` the pooled
    output of block b (1-based), for the last forward pass."""
    record: dict[int, Tensor] = {}

    def keep(b: int):
        return lambda module, args, out: record.__setitem__(b, pooled(out, channels_last))

    hooks = [blocks[0].module.register_forward_pre_hook(
        lambda module, args: record.__setitem__(0, pooled(args[0], channels_last)))]
    hooks += [block.module.register_forward_hook(keep(b)) for b, block in enumerate(blocks, 1)]
    try:
        yield record
    finally:
        for hook in hooks:
            hook.remove()


# --------------------------------------------------------------------------------------------- math


def gram(features: Tensor) -> Tensor:
    """``ĤĤᵀ``: cosine similarities of a batch of features."""
    h = F.normalize(features.float(), dim=1)
    return h @ h.T


def relation_discrepancy(features: Tensor, reference: Tensor) -> Tensor:
    """Eq. 12: ``d = mean_i ‖S_i − (ĤĤᵀ)_i‖₂`` for a reference similarity matrix ``S``."""
    return (reference - gram(features)).norm(dim=1).mean()


def block_scores(record: dict[int, Tensor], reference: Tensor, rows: Tensor | None = None) -> Tensor:
    """``s_b = d_{b−1} − d_b`` for b = 1..n from the recorded pooled features (optionally some rows)."""
    d = torch.stack([relation_discrepancy(record[b] if rows is None else record[b][rows], reference)
                     for b in range(len(record))])
    return d[:-1] - d[1:]


def renormalise(scores: Tensor, stages: list[str]) -> Tensor:
    """``n_stage · softmax_stage(s)``: scores comparable across stages of different depth."""
    out = torch.empty_like(scores)
    for stage in dict.fromkeys(stages):
        rows = [i for i, s in enumerate(stages) if s == stage]
        out[rows] = len(rows) * torch.softmax(scores[rows], dim=0)
    return out


def least_important(scores: Tensor, p: float) -> list[int]:
    """Indices of the ``int(p · n)`` lowest scores (Eq. 12's U)."""
    return torch.argsort(scores, stable=True)[: int(p * len(scores))].tolist()


# ---------------------------------------------------------------------------------------- measuring


@dataclass
class BlockScores:
    """Batch-averaged raw scores ``s_b`` of both branches (``cross`` None when that branch did not run)."""

    blocks: list[Block]
    high: Tensor
    cross: Tensor | None
    batches: int
    cross_samples: int
    cross_note: str

    def renormalised(self, scores: Tensor) -> Tensor:
        return renormalise(scores, [b.stage for b in self.blocks])


@torch.no_grad()
def measure_block_scores(gallery_net: nn.Module, batches: Iterable, query_net: nn.Module | None = None
                         ) -> BlockScores:
    """Run the two branches of RAHO over ``batches`` of ``(gallery_images, query_images, labels)``.

    ``gallery_net``: an encoder (``.backbone``, ``.forward_train`` giving ``feature`` and ``logits``);
    ``query_net``: the frozen query network, ``query_net(images)`` its embeddings. Pass the distillation
    batches, which hold each image at both resolutions; where ``query_images`` or ``labels`` is None the
    cross-resolution branch skips that batch.
    """
    backbone = gallery_net.backbone
    blocks = residual_blocks(backbone)
    channels_last = getattr(backbone, "output_fmt", "NCHW") == "NHWC"
    cross = query_net is not None and resnet_family(backbone)
    note = ("" if cross else "no query network given" if query_net is None
            else f"runs for ResNet-family galleries only, not {type(backbone).__name__}")
    device = next(gallery_net.parameters()).device
    high, low, samples = [], [], 0
    with ExitStack() as stack:
        for net in (gallery_net, query_net):
            if net is not None:
                stack.enter_context(eval_mode(net))
        record = stack.enter_context(recording(blocks, channels_last))
        for images, low_images, labels in batches:
            high.append(block_scores(record, gram(gallery_net.forward_train(images.to(device)).feature)))
            if not cross or low_images is None or labels is None:
                continue
            low_images = low_images.to(device)
            logits = gallery_net.forward_train(low_images).logits
            if logits is None:
                raise ConfigError("RAHO's cross-resolution branch needs the gallery network's identity "
                                  "classifier; set head: bnneck and num_classes on gallery_net")
            correct = logits.argmax(1) == labels.to(device)
            if correct.sum() >= 2:  # a relation needs two samples
                low.append(block_scores(record, gram(query_net(low_images)[correct]), rows=correct))
                samples += int(correct.sum())
    if not high:
        raise DataError("RAHO got no batches to measure block importance on; give it the distillation batches")
    if cross and not low:
        note = "no batch had two query-resolution images that the gallery network classifies correctly"
        log.warning("RAHO cross-resolution branch skipped: %s", note)
    return BlockScores(blocks, torch.stack(high).mean(0).cpu(), torch.stack(low).mean(0).cpu() if low else None,
                       len(high), samples, note)


# ---------------------------------------------------------------------------------- learning rates


def unimportant(scores: BlockScores, p: float = 0.3) -> tuple[list[str], list[str]]:
    """``U_hr`` and ``U_cr`` (Eq. 12): the blocks with the lowest renormalised scores of each branch;
    ``U_cr`` is empty when the cross-resolution branch did not run."""
    names = [b.name for b in scores.blocks]
    u_hr = [names[i] for i in least_important(scores.renormalised(scores.high), p)]
    u_cr = [] if scores.cross is None else [names[i] for i in least_important(scores.renormalised(scores.cross), p)]
    return u_hr, u_cr


def lr_tiers(scores: BlockScores, p: float = 0.3) -> dict[str, int]:
    """Eq. 13 as the exponent k of each block's learning rate ``γ^k η``: 0 for ``U_hr ∩ U_cr``, 1 for
    ``U_hr \\ U_cr``, 2 for the rest."""
    u_hr, u_cr = unimportant(scores, p)
    return {b.name: 0 if b.name in u_hr and b.name in u_cr else 1 if b.name in u_hr else 2
            for b in scores.blocks}


def raho_param_groups(net: nn.Module, blocks: list[Block], tiers: dict[str, int], lr: float,
                      gamma: float = 0.05) -> list[dict]:
    """Optimiser groups of ``net``'s trainable parameters, one per tier: ``lr · γ^k``; parameters
    outside every block (stem, head, classifier) take k = 2."""
    tier_of = {id(prm): tiers[b.name] for b in blocks for prm in b.module.parameters()}
    groups: dict[int, list[nn.Parameter]] = {0: [], 1: [], 2: []}
    for prm in net.parameters():
        if prm.requires_grad:
            groups[tier_of.get(id(prm), 2)].append(prm)
    return [{"params": params, "lr": lr * gamma**k, "raho_tier": k} for k, params in groups.items() if params]


def raho_report(scores: BlockScores, *, lr: float, p: float, gamma: float) -> dict:
    """What RAHO chose, JSON-able, for the run folder: per block its scores, tier and learning rate."""
    u_hr, u_cr = unimportant(scores, p)
    tiers = lr_tiers(scores, p)
    high = scores.renormalised(scores.high)
    cross = None if scores.cross is None else scores.renormalised(scores.cross)
    blocks = [{
        "name": block.name, "stage": block.stage,
        "score_hr": float(high[i]), "raw_score_hr": float(scores.high[i]),
        "score_cr": None if cross is None else float(cross[i]),
        "raw_score_cr": None if cross is None else float(scores.cross[i]),
        "tier": TIER_NAMES[tiers[block.name]], "lr": lr * gamma ** tiers[block.name],
    } for i, block in enumerate(scores.blocks)]
    return {
        "method": "RAHO", "source": SOURCE, "lr": lr, "p": p, "gamma": gamma, "batches": scores.batches,
        "cross_resolution": scores.cross is not None, "cross_resolution_samples": scores.cross_samples,
        "cross_resolution_note": scores.cross_note, "U_hr": u_hr, "U_cr": u_cr,
        "other_lr": lr * gamma**2, "blocks": blocks,
    }


def raho(gallery_net: nn.Module, batches: Iterable, lr: float, *, query_net: nn.Module | None = None,
         p: float = 0.3, gamma: float = 0.05) -> tuple[list[dict], dict]:
    """RAHO end to end: optimiser parameter groups for ``gallery_net`` and the report for the run folder."""
    if not 0 < p <= 1 or not 0 < gamma <= 1:
        raise ConfigError(f"RAHO needs 0 < p <= 1 and 0 < gamma <= 1, got p={p}, gamma={gamma}; "
                          "the paper uses p=0.3, gamma=0.05")
    scores = measure_block_scores(gallery_net, batches, query_net)
    groups = raho_param_groups(gallery_net, scores.blocks, lr_tiers(scores, p), lr, gamma)
    return groups, raho_report(scores, lr=lr, p=p, gamma=gamma)
