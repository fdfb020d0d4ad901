"""The training loop: one :class:`Trainer` for every recipe (:mod:`asymret.training.recipe`).

A run folder (DESIGN.md)::

    runs/<name>/config.yaml         the resolved config
    runs/<name>/metrics.jsonl       one JSON line per epoch: loss and its parts, lr, validation
    runs/<name>/checkpoints/last.pt model, optimiser, scheduler, RNG and epoch: exact resume
    runs/<name>/checkpoints/best.pt the trained network with the best validation mAP
    runs/<name>/query_net.pt        the final query network (an encoder checkpoint, usable as weights:)
    runs/<name>/pair.pt             both encoders' specs and weights: all ``asymret serve`` needs

The trainer owns the loop, checkpoints, resume, data parallelism, AMP and validation; the recipe (AML tuples,
or re-ID P×K + distillation) says which networks train and computes each step's loss. Every epoch's
randomness is drawn from ``(seed, epoch)``, so a resumed run repeats exactly the epochs an uninterrupted run
would have. Data parallel through ``torchrun`` (gloo on CPU, nccl on GPU): each rank trains on its share of
the epoch's batches and torch's DistributedDataParallel averages the gradients in buckets, overlapped with
the backward pass, before every optimiser step (:class:`StepModule`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from asymret import runtime
from asymret.config import dump_config
from asymret.errors import ConfigError, TrainingError
from asymret.files import atomic_write
from asymret.retrieval.checkpoints import load_torch_file, read_checkpoint_whitening
from asymret.retrieval.encoders import encoder_checkpoint
from asymret.retrieval.evaluate import evaluate_pair
from asymret.retrieval.pair import save_pair
from asymret.training.aml import AMLRecipe
from asymret.training.config import ExperimentConfig
from asymret.training.losses import LossOutput, loss_infos
from asymret.training.recipe import Recipe, RecipeContext, open_training_set
from asymret.training.reid import ReIDRecipe, uses_reid_recipe
from asymret.training.tensorboard import log_scalars

__all__ = ["StepModule", "Trainer", "lr_factor", "open_training_set", "train"]

log = logging.getLogger(__name__)


def lr_factor(epoch: int, cfg) -> float:
    """Learning-rate multiplier at ``epoch``: linear warm-up from 0.1x, then the schedule."""
    o = cfg.optim
    if epoch < o.warmup_epochs:
        return 0.1 + 0.9 * epoch / o.warmup_epochs
    if o.schedule == "exponential":
        return o.gamma ** epoch
    if o.schedule == "cosine":
        span = max(1, cfg.epochs - o.warmup_epochs)
        floor = o.min_lr / o.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (epoch - o.warmup_epochs) / span))
    return 1.0


def _atomic_save(obj, path: Path) -> None:
    """A checkpoint is either the old file or the new one, never torn (temp file, fsync, rename)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class StepModule(nn.Module):
    """What DistributedDataParallel wraps: the trained network and the loss's own parameters (FitNet/UGD
    projectors, kept in sync with it), with one recipe step as its forward. DDP only hooks the forward it
    wraps, and a step calls the network several times (AML's shape groups, the re-ID batches' two streams,
    ``forward_train``), so the whole step is that forward: one gradient reduction per backward."""

    def __init__(self, net: nn.Module, loss_fn: nn.Module, step):
        super().__init__()
        self.net, self.loss_fn = net, loss_fn
        self.step = step

    def forward(self, *batch):
        out = self.step(*batch)
        return out.total, out.parts


def data_parallel(module: StepModule, device: torch.device) -> DistributedDataParallel:
    """DDP over ``module``. ``find_unused_parameters``: a trained parameter that a step does not use (a classifier
    the step never calls) would otherwise stop DDP at the next step; the graph traversal it costs is small next
    to the step (``benchmarks/bench_train_step.py --ddp 2`` times it with the traversal on). Buffers are not
    synced at each forward: each rank keeps its own BatchNorm statistics, as the hand-written all-reduce it
    replaces did (the saved network is rank 0's; at the start all ranks hold the same weights and buffers)."""
    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    buffers = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else {"broadcast_buffers": False})  # older torch's name for it
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True, **buffers)


# ------------------------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path | None = None, progress: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir or Path(cfg.output_dir) / cfg.name)
        procs = runtime.processes()
        self.world, self.rank = procs.world, procs.rank
        self.device, _ = runtime.init_distributed(runtime.resolve_device(cfg.train.device, setting="train.device"))
        self.main = procs.main
        self.progress = progress and self.main
        self.amp = runtime.amp_enabled(self.device, cfg.train.amp)
        self._seed(cfg.seed)

        self.data = open_training_set(cfg.data)
        self.records = self.data.records
        self.labels = np.asarray(self.data.labels)
        loss_infos(cfg.loss.names)  # an unknown name is the ConfigError that lists the known ones
        self.ctx = RecipeContext(cfg=cfg, device=self.device, amp=self.amp, rank=self.rank, world=self.world,
                                 run_dir=self.run_dir, progress=self.progress, data=self.data)
        self.recipe: Recipe = ReIDRecipe(self.ctx) if uses_reid_recipe(cfg) else AMLRecipe(self.ctx)
        nets = self.networks = self.recipe.networks()
        self.query_net, self.gallery_net, self.loss_fn = nets.query_net, nets.gallery_net, nets.loss_fn
        self.symmetric, self.trained, self.net = nets.symmetric, nets.trained, nets.trained_net
        self._init_optimizer(self.recipe.param_groups(cfg.train.optim.lr))
        self.ddp = None
        if self.world > 1:
            self.ddp = data_parallel(StepModule(self.net, self.loss_fn, self.recipe.step), self.device)

    @property
    def gallery_emb(self) -> torch.Tensor | None:
        """The frozen gallery network's cached embeddings of the training images, where the recipe uses them."""
        return self.recipe.gallery_emb

    def _init_optimizer(self, params: list[dict]) -> None:
        cfg = self.cfg
        o = cfg.train.optim
        if o.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        elif o.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: lr_factor(e, cfg.train))
        self.epoch = 0
        self.best = -math.inf

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------------------------- epochs

    def _epoch_batches(self):
        """This epoch's ``(count, iterator of batches)``: the recipe's streams, zipped (``None`` for an absent one)."""
        streams = self.recipe.loaders(self.epoch)
        self.recipe.train_mode()
        return len(streams[0]), zip(*(itertools.repeat(None) if s is None else s for s in streams))

    def _forward(self, batch) -> LossOutput:
        """One step's loss: the recipe's step, under DDP through the wrapped :class:`StepModule`."""
        if self.ddp is None:
            return self.recipe.step(*batch)
        total, parts = self.ddp(*batch)
        return LossOutput(total, parts)

    def train_epoch(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        torch.manual_seed(cfg.seed * 100_003 + self.epoch)
        n_steps, batches = self._epoch_batches()
        totals: dict[str, float] = {}
        count = 0
        bar = tqdm(batches, total=n_steps, desc=f"epoch {self.epoch + 1}/{t.epochs}",
                   disable=not self.progress, unit="step", leave=False)
        self.optimizer.zero_grad(set_to_none=True)
        # A loss that sums over the step's tuples (AML's, as in its code) keeps summing across processes and
        # accumulated steps, so any split of the tuples gives the same gradient; a mean-reduced loss averages.
        # DDP averages over the processes: scaling a summed loss by their number makes that average the sum.
        sums = self.recipe.batch_reduction == "sum"
        scale = float(self.world) if sums else 1.0 / t.accumulate
        for step, batch in enumerate(bar):
            sync = (step + 1) % t.accumulate == 0 or step + 1 == n_steps
            # no_sync covers forward and backward: DDP decides at the forward whether this backward reduces
            with contextlib.nullcontext() if sync or self.ddp is None else self.ddp.no_sync():
                with runtime.autocast(self.device, self.amp):
                    out = self._forward(batch)
                loss = out.total.float()
                if not torch.isfinite(loss):
                    parts = ", ".join(f"{k}={float(v):.4g}" for k, v in out.parts.items())
                    raise TrainingError(f"loss became {loss.item()} at epoch {self.epoch + 1}, step {step + 1}"
                                        f"{' (' + parts + ')' if parts else ''}; lower train.optim.lr or check "
                                        "the data; the last good checkpoint is kept")
                (loss * scale).backward()
            if sync:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            count += 1
            totals["loss"] = totals.get("loss", 0.0) + loss.item()
            for k, v in out.parts.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            bar.set_postfix(loss=f"{totals['loss'] / count:.4f}")
        self.scheduler.step()
        return {k: v / max(count, 1) for k, v in totals.items()}

    # ------------------------------------------------------------------------------ validation

    def validate(self) -> dict | None:
        e = self.cfg.eval
        if e.benchmark == "none" or not self.main:
            return None
        gallery = self.query_net if self.symmetric else self.gallery_net
        row = "symmetric" if self.symmetric else "asymmetric"
        co_trained = self.trained == "gallery_net"  # ACD: the gallery changes, so its embeddings are not cached
        result = evaluate_pair(self.query_net, gallery, e.benchmark, e.root, distractors=e.distractors,
                               multiscale=e.multiscale, rows=(row,), device=self.device,
                               num_workers=self.cfg.data.num_workers,
                               cache_dir=None if co_trained else Path(self.cfg.output_dir) / ".cache")[row]
        score = result["medium"]["mAP"] if "medium" in result else result["mAP"]
        return {"row": row, "score": score, **result}

    # ------------------------------------------------------------------------------ checkpoints

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def state(self) -> dict:
        return {
            "epoch": self.epoch, "best": self.best,
            "trained": self.trained, self.trained: self.net.state_dict(), "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state()},
            "config": self.cfg.model_dump(mode="json"),
        }

    def load_state(self, path: Path) -> None:
        ckpt = load_torch_file(path, map_location=self.device, weights_only=False)
        trained = ckpt.get("trained", "query_net")
        if trained != self.trained:
            raise ConfigError(f"{path} trained the {trained} but this config trains the {self.trained}; "
                              "resume with the config that started the run")
        self.net.load_state_dict(ckpt[trained])
        self.loss_fn.load_state_dict(ckpt["loss"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch, self.best = ckpt["epoch"], ckpt["best"]
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(ckpt["rng"]["numpy"])
        torch.set_rng_state(ckpt["rng"]["torch"])

    # --------------------------------------------------------------------------------------- run

    def fit(self, resume: bool = False) -> Path:
        cfg = self.cfg
        last = self.ckpt_dir / "last.pt"
        if self.main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        if resume and last.is_file():
            self.load_state(last)
            log.info("resumed %s after epoch %d", self.run_dir, self.epoch)
        elif self.main and (self.run_dir / "metrics.jsonl").exists() and not resume:
            (self.run_dir / "metrics.jsonl").unlink()
        start = time.perf_counter()
        while self.epoch < cfg.train.epochs:
            t0 = time.perf_counter()
            stats = self.train_epoch()
            self.epoch += 1
            record = {"epoch": self.epoch, **stats, "lr": self.optimizer.param_groups[0]["lr"]}
            every = cfg.train.validate_every
            if every and (self.epoch % every == 0 or self.epoch == cfg.train.epochs):
                val = self.validate()
                if val is not None:
                    record["val"] = val
                    if val["score"] > self.best:
                        self.best = val["score"]
                        if self.main:
                            _atomic_save(encoder_checkpoint(self.net), self.ckpt_dir / "best.pt")
            record["time_s"] = round(time.perf_counter() - t0, 3)
            if self.main:
                _atomic_save(self.state(), last)
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                log_scalars(self.run_dir, record, final=self.epoch >= cfg.train.epochs)
                msg = f"epoch {self.epoch}/{cfg.train.epochs} loss {stats.get('loss', float('nan')):.4f}"
                if "val" in record:
                    msg += f" val mAP {100 * record['val']['score']:.2f}"
                log.info("%s (%.1fs)", msg, record["time_s"])
            if self.world > 1:
                dist.barrier()
        if self.main:
            self.export()
            log.info("done in %.1fs: %s", time.perf_counter() - start, self.run_dir)
        return self.run_dir

    def export(self) -> Path:
        """``<trained>.pt`` (``query_net.pt``, or ``gallery_net.pt`` for ACD) and ``pair.pt`` from the best
        checkpoint (or the last without validation). An ACD pair also holds the gallery network as it was
        before co-training, for the gallery-alone and SIR rows of ``asymret evaluate``. With
        ``whitening.learn`` each network's learned whitening goes into the pair (:meth:`learn_whitenings`)."""
        best = self.ckpt_dir / "best.pt"
        net = self.net
        if best.is_file():
            net = copy.deepcopy(self.net).cpu()
            net.load_state_dict(load_torch_file(best)["state_dict"])
        _atomic_save(encoder_checkpoint(net), self.run_dir / f"{self.trained}.pt")
        meta = {"run": self.cfg.name, "loss": self.cfg.loss.name, "mode": self.cfg.loss.mode,
                "recipe": self.recipe.name}
        if self.trained == "gallery_net":
            meta["acd"] = True
            reference = self.networks.reference_gallery
            white = self.learn_whitenings({"query_net": self.query_net, "gallery_net": net,
                                           "reference_gallery_net": reference})
            return save_pair(self.run_dir / "pair.pt", self.query_net, net, meta=meta, reference_gallery=reference,
                             whitening=white.get("gallery_net"), query_whitening=white.get("query_net"),
                             reference_whitening=white.get("reference_gallery_net"))
        gallery = net if self.symmetric else self.gallery_net
        # a converted cirtorch gallery network carries its learned whitening, which both sides then use (AML); a
        # network trained here (symmetric) has moved away from the weights that whitening was learned for
        whitening = None if self.symmetric else read_checkpoint_whitening(
            gallery.spec.weights, multiscale=len(gallery.spec.input.scales) > 1)
        if whitening is not None and not whitening.info:
            whitening.info = {"learned_on": f"the gallery network's weights file {gallery.spec.weights}"}
        learn = {"query_net": net}
        if whitening is None or not self.cfg.whitening.keep_checkpoint:
            learn["gallery_net"] = gallery
        white = self.learn_whitenings(learn)
        return save_pair(self.run_dir / "pair.pt", net, gallery, meta=meta,
                         whitening=white.get("gallery_net", whitening), query_whitening=white.get("query_net"))

    def learn_whitenings(self, networks: dict) -> dict:
        """With ``whitening.learn``: each of ``networks``' whitening from the training set's matching pairs
        (:func:`asymret.training.whiten.learn_whitenings`); a frozen gallery network's embeddings come from
        the embedding cache, so it does not encode the training images again. Else ``{}``."""
        cfg = self.cfg
        if not cfg.whitening.learn:
            return {}
        from asymret.training.whiten import learn_whitenings

        embeddings = {}
        frozen = networks.get("gallery_net")
        if frozen is not None and frozen is self.gallery_net and self.trained != "gallery_net" and not self.symmetric:
            embeddings["gallery_net"] = self.ctx.cache.get(
                frozen, self.records, batch_size=32, num_workers=cfg.data.num_workers, device=self.device,
                progress=self.progress)
        source = cfg.data.pkl or cfg.data.csv or cfg.data.root
        networks = {name: n.to(self.device).eval() for name, n in networks.items()}
        return learn_whitenings(networks, self.data, cfg.whitening, seed=cfg.seed, embeddings=embeddings,
                                source_name=f"{cfg.data.format} {source}", device=self.device,
                                num_workers=cfg.data.num_workers, progress=self.progress)


def train(cfg: ExperimentConfig, resume: bool = False, progress: bool = True) -> Path:
    return Trainer(cfg, progress=progress).fit(resume=resume)
