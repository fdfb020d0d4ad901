"""Losses by name: ``create_loss("contr_plus")`` builds a loss with its paper's defaults.

Contract (DESIGN.md): a loss receives one :class:`LossBatch` and returns a :class:`LossOutput`, the
scalar to minimise plus its named parts for logging. The formula itself lives in a small pure
function next to its citation; the registered ``nn.Module`` only holds hyper-parameters (and learned
state where a method has some, e.g. a projector) and calls that function.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from asymret.errors import ConfigError


@dataclass
class LossBatch:
    """Everything a loss may need; each loss reads the fields it names in ``needs``.

    Shapes: B items, D dims. Embeddings are L2-normalised unless a loss says otherwise.

    ``query``      (B, D) query-side embeddings, through the query network (anchors in AML).
    ``gallery``    (B, D) gallery-side embeddings of the same B images (``g_a`` in AML; the gallery
                   network's view of each image, possibly at another resolution).
    ``positive``   (B, P, D) positives of each anchor (AML tuples; gallery side when asymmetric).
    ``negative``   (B, N, D) negatives of each anchor (AML tuples).
    ``labels``     (B,) identity / cluster labels.
    ``query_logits``, ``gallery_logits``, ``collab_logits`` (B, C) classifier outputs (re-ID, ACD).
    ``query_raw``, ``gallery_raw`` (B, D) un-normalised features where a method needs them.
    ``uncertainty`` (B,) gallery-side variance per item (attentive regression).
    ``query_confidence``, ``gallery_confidence`` (B,) per-item confidences (simdistill).
    """

    query: Tensor | None = None
    gallery: Tensor | None = None
    positive: Tensor | None = None
    negative: Tensor | None = None
    labels: Tensor | None = None
    query_logits: Tensor | None = None
    gallery_logits: Tensor | None = None
    collab_logits: Tensor | None = None
    query_raw: Tensor | None = None
    gallery_raw: Tensor | None = None
    uncertainty: Tensor | None = None
    query_confidence: Tensor | None = None
    gallery_confidence: Tensor | None = None


@dataclass
class LossOutput:
    total: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LossInfo:
    name: str
    cls: type
    summary: str
    source: str
    equation: str
    needs: tuple[str, ...]
    family: str
    batch_reduction: str = "mean"

    @property
    def defaults(self) -> dict:
        sig = inspect.signature(self.cls.__init__)
        return {k: p.default for k, p in sig.parameters.items()
                if k != "self" and p.default is not inspect.Parameter.empty}


LOSSES: dict[str, LossInfo] = {}


def register_loss(name: str, *, summary: str, source: str, equation: str, needs: tuple[str, ...],
                  family: str, batch_reduction: str = "mean") -> Callable[[type], type]:
    """Register an ``nn.Module`` class whose ``__init__`` keyword defaults are the paper's defaults.

    ``batch_reduction`` says how the loss reduces over the items (tuples) of a batch: ``"mean"``, or
    ``"sum"`` where the reference code sums (AML's tuple losses). The trainer reads it to combine the
    gradients of several processes or accumulated steps the same way (summed, or averaged).
    """
    if batch_reduction not in ("mean", "sum"):
        raise ValueError(f"batch_reduction must be 'mean' or 'sum', not {batch_reduction!r}")

    def wrap(cls: type) -> type:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' registered twice")
        LOSSES[name] = LossInfo(name, cls, summary, source, equation, tuple(needs), family, batch_reduction)
        cls.loss_name = name
        cls.batch_reduction = batch_reduction
        return cls

    return wrap


def create_loss(name: str, **params) -> nn.Module:
    """Build a registered loss with its defaults, overridden by ``params``."""
    from asymret.training import losses as _all  # noqa: F401  (registers every loss)

    if name not in LOSSES:
        raise ConfigError(f"unknown loss '{name}'; choose one of: {', '.join(sorted(LOSSES))}")
    info = LOSSES[name]
    unknown = sorted(set(params) - set(info.defaults))
    if unknown:
        raise ConfigError(f"loss '{name}' has no parameter {', '.join(map(repr, unknown))}; "
                          f"its parameters are: {', '.join(info.defaults) or 'none'}")
    return info.cls(**params)


def list_losses() -> list[LossInfo]:
    from asymret.training import losses as _all  # noqa: F401

    return [LOSSES[k] for k in sorted(LOSSES)]


def require(batch: LossBatch, loss_name: str, *fields: str) -> list[Tensor]:
    """The named batch fields, or a clear error saying which one the caller forgot."""
    values = []
    for f in fields:
        v = getattr(batch, f)
        if v is None:
            raise ConfigError(f"loss '{loss_name}' needs batch field '{f}', which the trainer did not provide")
        values.append(v)
    return values

