"""Losses by name: ``create_loss("contr_plus")`` builds a loss with its paper's defaults.

Contract (DESIGN.md): a loss receives one :class:`LossBatch` and returns a :class:`LossOutput`, the
scalar to minimise plus its named parts for logging. The formula itself lives in a small pure
function next to its citation; the registered ``nn.Module`` only holds hyper-parameters (and learned
state where a method has some, e.g. a projector) and calls that function.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
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
    ``query_raw``, ``gallery_raw`` (B, D) un-normalised features where a method needs them (re-ID: the
                   BN-neck output before L2, what the D3still code's distillers receive as ``retrieval_feat``).
    ``query_stages`` the query network's last four backbone stage maps (B, C_l, H_l, W_l), l = 1..4 (UGD).
    ``gallery_local``, ``gallery_local_logits`` one (B, T, D) / (B, T, C) tensor per granularity of the loss's
                   ``local_grids``: the gallery head's features / logits of its final map's cells (UGD).
    ``uncertainty`` (B,) gallery-side variance per item (attentive regression).
    ``query_confidence``, ``gallery_confidence`` (B,) per-item confidences (simdistill).

    Naming convention: the ``query*`` fields are the query network's side and the ``gallery*`` fields the gallery
    network's, whichever of the two trains, with one exception: a network's own supervised losses (``ce_ls``,
    ``triplet_bh``, ``reid_supervised``) read a single network, which fills the ``query*`` fields even when it
    is the gallery network (ACD co-training). :meth:`own` builds that batch, so the exception is written once.
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
    query_stages: tuple[Tensor, ...] | None = None
    gallery_local: tuple[Tensor, ...] | None = None
    gallery_local_logits: tuple[Tensor, ...] | None = None
    uncertainty: Tensor | None = None
    query_confidence: Tensor | None = None
    gallery_confidence: Tensor | None = None

    @classmethod
    def own(cls, embedding: Tensor, logits: Tensor | None, labels: Tensor) -> LossBatch:
        """The batch of the trained network's own supervised loss: its embedding and logits in the ``query*``
        fields, whichever side it encodes (class doc)."""
        return cls(query=embedding, query_logits=logits, labels=labels)


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

    ``needs`` is the one declaration of the :class:`LossBatch` fields the loss reads: the registry checks them
    before every ``forward`` (a missing one is the ConfigError that names it), and the recipes read them to
    fill exactly those fields.

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
        if not getattr(cls.forward, "checks_needs", False):  # a subclass of a registered loss is checked once
            cls.forward = _checked_forward(cls.forward)
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


class CombinedLoss(nn.Module):
    """Several losses in one run: ``L = Σ_i w_i · L_i`` over one :class:`LossBatch` (e.g. 3DG-STFM Eq. (9),
    ``λ2 L_MQD + λ3 L_att``).

    Parts, for logging: ``<name>`` is the weighted total ``w_i · L_i`` (the parts so named sum to ``total``),
    ``<name>/<part>`` each of that loss's own parts, unweighted. ``needs`` is the union of the losses'
    ``needs``, in order.
    """

    def __init__(self, terms: Sequence[tuple[str, float, dict]]):
        super().__init__()
        names = [name for name, _, _ in terms]
        if not names:
            raise ConfigError("a combined loss needs at least one loss; give a list of {name, weight, params}")
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ConfigError(f"the loss list names {', '.join(map(repr, doubled))} more than once; list each "
                              "loss once, with its weight")
        self.losses = nn.ModuleDict({name: create_loss(name, **params) for name, _, params in terms})
        self.weights = {name: float(weight) for name, weight, _ in terms}
        self.needs = tuple(dict.fromkeys(f for name in names for f in LOSSES[name].needs))
        reductions = {LOSSES[name].batch_reduction for name in names}
        if len(reductions) > 1:
            sums = [n for n in names if LOSSES[n].batch_reduction == "sum"]
            raise ConfigError(f"the loss list mixes losses summed over the batch's tuples ({', '.join(sums)}) with "
                              "mean-reduced ones, whose gradients processes and accumulated steps combine "
                              "differently; train them in separate runs")
        self.batch_reduction = reductions.pop()  # read by the trainer, as a single loss's

    def forward(self, batch: LossBatch) -> LossOutput:
        total, parts = None, {}
        for name, loss in self.losses.items():
            out = loss(batch)
            weighted = self.weights[name] * out.total
            total = weighted if total is None else total + weighted
            parts[name] = weighted.detach()
            parts.update({f"{name}/{k}": v for k, v in out.parts.items()})
        return LossOutput(total, parts)


def build_loss(specs: Sequence[tuple[str, float, dict]]) -> nn.Module:
    """The run's loss from ``(name, weight, params)`` specs (``LossConfig.specs()``): a single loss of weight 1
    is that loss itself (as ``create_loss`` builds it); anything else a :class:`CombinedLoss`."""
    if len(specs) == 1 and specs[0][1] == 1.0:
        name, _, params = specs[0]
        return create_loss(name, **params)
    return CombinedLoss(specs)


def loss_infos(names: Sequence[str]) -> list[LossInfo]:
    """The registry entries of ``names``; an unknown name is the ConfigError that lists the known ones."""
    from asymret.training import losses as _all  # noqa: F401

    for name in names:
        if name not in LOSSES:
            create_loss(name)  # raises the error that lists every registered loss
    return [LOSSES[name] for name in names]


def combined_needs(names: Sequence[str]) -> tuple[str, ...]:
    """The batch fields a run with these losses must provide: the union of their ``needs``, in order."""
    return tuple(dict.fromkeys(f for info in loss_infos(names) for f in info.needs))


def list_losses() -> list[LossInfo]:
    from asymret.training import losses as _all  # noqa: F401

    return [LOSSES[k] for k in sorted(LOSSES)]


def check_needs(batch: LossBatch, loss_name: str, needs: Sequence[str]) -> None:
    """Every field a loss ``needs`` is in ``batch``, or a clear error saying which one the caller forgot."""
    for f in needs:
        if getattr(batch, f) is None:
            raise ConfigError(f"loss '{loss_name}' needs batch field '{f}', which the trainer did not provide")


def _checked_forward(forward: Callable) -> Callable:
    """``forward`` that first checks the batch against the registered ``needs`` of the instance's loss."""

    @functools.wraps(forward)
    def checked(self, batch: LossBatch) -> LossOutput:
        check_needs(batch, self.loss_name, LOSSES[self.loss_name].needs)
        return forward(self, batch)

    checked.checks_needs = True
    return checked


def detached_parts(**terms: Tensor) -> dict[str, Tensor]:
    """A loss's named parts for logging: each term without gradient (``LossOutput.parts``)."""
    return {name: t.detach() for name, t in terms.items()}
