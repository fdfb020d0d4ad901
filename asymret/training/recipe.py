"""What a training recipe is, what it receives, and the pieces every recipe shares.

The :class:`~asymret.training.trainer.Trainer` owns the loop, checkpoints, resume, data parallelism, AMP and
validation. A *recipe* says what one run trains and how one step's loss is computed:

* :meth:`Recipe.networks`: the networks (query, gallery, which one trains, the loss module whose learned
  state is checkpointed with it);
* :meth:`Recipe.param_groups`: the optimiser's groups;
* :meth:`Recipe.loaders`: one epoch's batches, as parallel streams (one batch is one item of each);
* :meth:`Recipe.step`: one batch's :class:`~asymret.training.losses.LossOutput`.

A recipe receives a :class:`RecipeContext` (config, device, autocast, processes, the training set, the cache
of gallery embeddings) and never sees or edits the trainer. Two recipes exist: the AML tuples
(:mod:`asymret.training.aml`) and the re-ID P×K batches plus distillation (:mod:`asymret.training.reid`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from asymret import runtime
from asymret.errors import AsymretError, ConfigError
from asymret.retrieval.cache import EmbeddingCache
from asymret.retrieval.encoders import Encoder
from asymret.training.config import DataConfig, ExperimentConfig
from asymret.training.losses import LossOutput


def open_training_set(cfg: DataConfig):
    """The labelled training images a config names (records, labels, optional SfM pairs)."""
    from asymret.retrieval import datasets as D

    if cfg.format == "sfm120k":
        return D.SfM120k(cfg.pkl, image_root=cfg.root or None)
    if cfg.format == "csv":
        return D.CsvDataset(cfg.csv, root=cfg.root or None)
    if cfg.format == "veri776":
        return D.LabelledSet(D.VeRi776(cfg.root).train)
    if cfg.format in ("msmt17", "inshop", "sop", "cub200"):  # their train split (ACD's other benchmarks)
        return D.LabelledSet(D.open_dataset(cfg.format, root=cfg.root).train)
    return D.LabelledFolder(cfg.root)


@dataclass
class RecipeContext:
    """Everything a recipe may read about the run: set up by the trainer, never a way back to it."""

    cfg: ExperimentConfig
    device: torch.device
    amp: bool  # bf16 autocast (GPU only)
    rank: int
    world: int
    run_dir: Path
    progress: bool  # progress bars (rank 0 only)
    data: Any  # the training set: ``records``, ``labels`` (and SfM's ``qidxs``/``pidxs``)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def records(self) -> list:
        return self.data.records

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.data.labels)

    @property
    def cache(self) -> EmbeddingCache:
        """The run's embedding cache (``<output_dir>/.cache``), shared by the runs of one output folder."""
        return EmbeddingCache(Path(self.cfg.output_dir) / ".cache")

    def autocast(self):
        return runtime.autocast(self.device, self.amp)

    def rank0_first(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` on rank 0, then on the other ranks once rank 0 is done: a cached computation runs once
        and the others read its result."""
        if self.main:
            out = compute()
        if self.world > 1:
            dist.barrier()
        if not self.main:
            out = compute()
        return out

    def gallery_embeddings(self, gallery_net: Encoder) -> torch.Tensor:
        """The frozen gallery network's embedding of every training image, computed once (rank 0) and cached."""
        emb = self.rank0_first(lambda: self.cache.get(
            gallery_net, self.records, batch_size=32, num_workers=self.cfg.data.num_workers, device=self.device,
            progress=self.progress))
        return torch.from_numpy(np.array(emb, dtype=np.float32)).to(self.device)


@dataclass
class Networks:
    """A recipe's networks. ``trained`` names the one the optimiser updates (``"query_net"``, or ``"gallery_net"``
    when ACD co-trains the gallery); ``loss_fn`` is the module whose learned state (FitNet/UGD projectors) trains
    and is checkpointed with it; ``reference_gallery`` is ACD's gallery network as it was before co-training."""

    query_net: Encoder
    gallery_net: Encoder | None
    trained: str
    loss_fn: nn.Module
    symmetric: bool = False
    reference_gallery: Encoder | None = None

    @property
    def trained_net(self) -> Encoder:
        return self.gallery_net if self.trained == "gallery_net" else self.query_net


class Recipe:
    """The interface a training method implements (module doc). ``batch_reduction`` says how the step's loss
    reduces over its items: ``"sum"`` (AML's tuple losses) keeps summing across processes and accumulated
    steps, ``"mean"`` averages."""

    name = "recipe"
    batch_reduction = "mean"
    gallery_emb: torch.Tensor | None = None  # the frozen gallery's cached embeddings, where the recipe uses them

    def networks(self) -> Networks:
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict]:
        raise NotImplementedError

    def loaders(self, epoch: int) -> Sequence:
        """The epoch's batches as parallel streams of equal length (``None`` for a stream absent this run); the
        trainer zips them and calls ``step(*items)``."""
        raise NotImplementedError

    def train_mode(self) -> None:
        """Put the networks in their training-time modes before an epoch."""
        raise NotImplementedError

    def step(self, *batch) -> LossOutput:
        raise NotImplementedError


# ------------------------------------------------------------------------------- shared by the recipes


def raise_broken(items) -> None:
    """A broken image comes back from a loader worker as its error, not a worker traceback: raise it here."""
    for item in items:
        if isinstance(item, AsymretError):
            raise item


def check_dims(query_net: Encoder, gallery_net: Encoder | None, loss_fn: nn.Module | None, fix: str) -> None:
    """Both networks give embeddings of one size, unless the loss learns a map between them (a projector)."""
    if gallery_net is None or query_net.dim == gallery_net.dim:
        return
    if loss_fn is not None and list(loss_fn.parameters()):
        return
    raise ConfigError(f"query_net gives {query_net.dim}-d embeddings but gallery_net gives {gallery_net.dim}-d; {fix}")


def trained_param_groups(net: Encoder, loss_fn: nn.Module | None, cfg: ExperimentConfig, lr: float) -> list[dict]:
    """The trained network's groups (AML's GeM rule: p at ``gem_lr_mult`` x lr, no weight decay; the head at
    ``head_lr_mult`` x lr) plus the loss's own parameters (projectors) at ``lr``."""
    o = cfg.train.optim
    groups = net.param_groups(lr, o.gem_lr_mult, o.head_lr_mult)
    params = [] if loss_fn is None else list(loss_fn.parameters())
    if params:
        groups.append({"params": params, "lr": lr})
    return groups
