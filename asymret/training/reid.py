"""The re-ID training recipe (D3still and its baselines, ACD co-training; methods.md §3-4).

Every step holds two batches (the "two-stream batch" of the D3still/ACD code):

* a **P×K batch** (:class:`~asymret.training.samplers.IdentitySampler`, 16 × 6 by default) through the
  *trained* network, for its own supervised loss: CE with label smoothing on the classifier logits plus
  batch-hard triplet on the pooled feature (``reid_supervised``);
* a **distillation batch** (:class:`~asymret.training.samplers.DistillationSampler`, random images) seen
  at query resolution by the query network and at gallery resolution by the gallery network, for the
  distillation loss named by ``loss.name`` (``fitnet``, ``cc``, ``csd``, ``raml``, ``rop``, ``d3still``,
  ``vanilla_kd``, ``pkt``, ``ugd``, ``mqd``, ``simdistill``, ``attentive``, or an AML loss that reads only
  ``query``/``gallery``). The loss gets exactly the :class:`LossBatch` fields its registration names in
  ``needs`` (:data:`PROVIDED`), e.g. the raw BN-neck features (``query_raw``, ``gallery_raw``) that the
  D3still code's distillers receive, the logits, the query network's stage maps and the gallery network's
  local head features (UGD); the other fields stay None.

Three modes, chosen by the config:

* **frozen gallery** (default): the query network is trained. Its P×K batch is at query resolution;
  the gallery side of the distillation batch comes from the embedding cache (the frozen gallery network
  encodes every training image once, at gallery resolution): the L2-normalised embedding, or, for a loss
  that needs the gallery's head outputs, one cache entry of its raw BN-neck feature (the embedding is its
  L2 normalisation, the logits its classifier's output) plus, for UGD, its local head features (float16).
  With ``train.reid.distill_augment`` both views are augmented independently (the D3still code's
  distillation loader), which no cache can hold: the frozen gallery network then runs on its view each step
  (eval mode, no gradient).
* **alone** (``loss.mode: symmetric`` or a supervised loss such as ``reid_supervised``): no gallery
  network, no distillation stream: how a gallery network itself is trained, and the "no teacher" row.
* **ACD** (``gallery_frozen: false``): the query network is frozen (eval mode, from an earlier run's
  pair file); the gallery network and its classifier are trained. The P×K batch is at gallery
  resolution; on the distillation batch the total is ``w · L_base(q, g) + L_ACD(z^q, z^g, z^c)``
  with ``z^c = W_g(½(g + q))`` on the un-normalised head features (methods.md §4, Eq. 3). Before the
  first epoch RAHO measures block importance on a few distillation batches and sets the learning-rate
  tiers; its choice is written to ``raho.json`` in the run folder and reused on resume (only when the
  starting weights and RAHO settings it records are the same).
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from asymret.errors import ConfigError
from asymret.retrieval.encode import RecordImages
from asymret.retrieval.encoders import Encoder, create_encoder, eval_mode, set_bn_eval
from asymret.retrieval.transforms import build_reid_train_transform
from asymret.training.losses import (
    LOSSES,
    LossBatch,
    LossOutput,
    build_loss,
    combined_needs,
    create_loss,
    loss_infos,
)
from asymret.training.recipe import (
    Networks,
    Recipe,
    RecipeContext,
    check_dims,
    raise_broken,
    trained_param_groups,
)
from asymret.training.reid_gallery import gallery_head_outputs, gallery_uncertainty, stack_by_shape
from asymret.training.samplers import DistillationSampler, IdentitySampler

log = logging.getLogger(__name__)

SUPERVISED = ("reid_supervised", "ce_ls", "triplet_bh")  # a network's own loss: nothing to distil
# the LossBatch fields the recipe fills on the distillation batch, for the losses that name them in ``needs``
PROVIDED = frozenset({"query", "gallery", "query_raw", "gallery_raw", "query_logits", "gallery_logits",
                      "query_stages", "gallery_local", "gallery_local_logits", "labels", "uncertainty"})
GALLERY_HEAD = frozenset({"gallery_raw", "gallery_logits", "gallery_local", "gallery_local_logits"})
LOCAL = frozenset({"query_stages", "gallery_local", "gallery_local_logits"})


def uses_reid_recipe(cfg) -> bool:
    """``train.recipe: auto`` picks the re-ID recipe for re-ID, local-feature and ACD losses (any of them, for
    several losses in one run)."""
    if cfg.train.recipe != "auto":
        return cfg.train.recipe == "reid"
    families = {LOSSES[name].family for name in cfg.loss.names if name in LOSSES}
    return not cfg.gallery_frozen or bool(families & {"reid", "local", "acd"})


class ReIDRecipe(Recipe):
    """Builds the networks and losses of a re-ID run and computes one step's loss (see the module doc).

    ``trained`` names the trained network (``"query_net"``, or ``"gallery_net"`` under ACD), ``trained_net``
    is that network.
    """

    name = "reid"

    def __init__(self, ctx: RecipeContext):
        self.ctx = ctx
        cfg = ctx.cfg
        self.cfg, self.rc, self.device = cfg, cfg.train.reid, ctx.device
        self.co_train = not cfg.gallery_frozen
        names = cfg.loss.names
        self.alone = cfg.loss.mode == "symmetric" or (not cfg.loss.terms and cfg.loss.name in SUPERVISED)
        self.reference_gallery: Encoder | None = None
        self.supervised = create_loss("reid_supervised", **{**self.rc.supervised, **(
            cfg.loss.params if cfg.loss.name == "reid_supervised" else {})}).to(self.device)
        own = [n for n in names if n in SUPERVISED]
        if cfg.loss.terms and own:
            raise ConfigError(f"the re-ID recipe adds the network's own loss (reid_supervised: CE + batch-hard "
                              f"triplet) to every step; remove {', '.join(map(repr, own))} from the loss list and set "
                              "its weights in train.reid.supervised (ce_weight, triplet_weight)")
        if cfg.loss.name in SUPERVISED and cfg.loss.name != "reid_supervised":
            raise ConfigError(f"in the re-ID recipe the network's own loss is always reid_supervised (CE + "
                              f"batch-hard triplet); use loss.name: reid_supervised (with params) instead of "
                              f"'{cfg.loss.name}'")
        if not self.alone:
            self._check_needs(names)
        self.loss_fn = None if self.alone else build_loss(cfg.loss.specs()).to(self.device)
        self.acd = (create_loss("acd", alpha=cfg.acd.alpha, beta=cfg.acd.beta, tau=cfg.acd.tau).to(self.device)
                    if self.co_train else None)
        if self.co_train and cfg.loss.mode == "symmetric":
            raise ConfigError("ACD co-training needs a base distillation method (loss.name), not loss.mode: symmetric")
        self._build_networks()
        self.labels = ctx.labels
        self.num_ids = len(np.unique(self.labels))
        self._check_classifier(self.trained_net, "gallery_net" if self.co_train else "query_net")
        if self.co_train:
            self._check_classifier(self.query_net, "the frozen query network")
        # what the run's losses read (the union over a loss list); _check_needs has refused what PROVIDED lacks
        self.needs = frozenset(combined_needs(names)) if self.loss_fn is not None else frozenset()
        if self.needs & LOCAL and self.co_train:
            raise ConfigError(f"loss '{cfg.loss.name}' reads local features, which the re-ID recipe provides with a "
                              "frozen gallery network only; train it with gallery_frozen: true")
        if self.needs & {"gallery_logits", "gallery_local_logits"}:
            self._check_classifier(self.gallery_net, "the gallery network")
        for loss in [] if self.loss_fn is None else list(self.loss_fn.modules()):
            if hasattr(loss, "setup"):  # learned state sized by the networks (ugd's projectors), in a list too
                loss.setup(self.query_net, self.gallery_net)
        if self.loss_fn is not None:
            self.loss_fn.to(self.device)
        self.uncertainty = None
        self.gallery_raw: torch.Tensor | None = None  # frozen gallery: (N, dim) raw head features, on the device
        self.gallery_local: list[np.ndarray] = []  # frozen gallery: (N, cells, dim) float16 memmaps, per grid
        self.live_gallery = self.rc.distill_augment and not self.alone  # the frozen gallery runs every step
        if not self.alone and not self.co_train and not self.live_gallery:
            if self.needs & GALLERY_HEAD:
                self.gallery_raw, self.gallery_local = gallery_head_outputs(ctx, self.gallery_net, self._local_grids(),
                                                                            cfg.loss.name)
                self.gallery_emb = F.normalize(self.gallery_raw, dim=1)
            else:
                self.gallery_emb = ctx.gallery_embeddings(self.gallery_net)
        if "uncertainty" in self.needs:
            self.uncertainty = gallery_uncertainty(ctx, self.reference_gallery or self.gallery_net,
                                                   self.rc.uncertainty_views)

    @staticmethod
    def _check_needs(names: list[str]) -> None:
        """Every loss must read only what a distillation batch gives (AML's tuples and ACD's logits it does not)."""
        for info in loss_infos(names):
            extra = set(info.needs) - set(PROVIDED)
            if not extra:
                continue
            msg = f"loss '{info.name}' needs {', '.join(sorted(extra))}, which the re-ID recipe does not provide"
            if {"positive", "negative"} & extra and len(names) > 1:
                others = ", ".join(n for n in names if n != info.name)
                msg += (f"; AML tuple losses train in the AML recipe (anchor, positive, negatives) and cannot be "
                        f"combined with {others} in one run")
            elif "acd" in names:
                msg += "; ACD's loss is added by gallery_frozen: false (acd.alpha, acd.beta), not listed under loss"
            else:
                msg += "; use a distillation loss (asymret losses)"
            raise ConfigError(msg)

    # ------------------------------------------------------------------------------------- setup

    def _build_networks(self) -> None:
        cfg = self.cfg
        if self.co_train and cfg.acd.pair:
            from asymret.retrieval.pair import load_pair

            pair = load_pair(cfg.acd.pair, device=self.device)
            self.query_net, self.gallery_net = pair.query_net, pair.gallery_net
        else:
            self.query_net = create_encoder(cfg.query_net).to(self.device)
            self.gallery_net = None if self.alone else create_encoder(cfg.gallery_net).to(self.device)
        if self.co_train:
            self.query_net.eval().requires_grad_(False)
            self.reference_gallery = copy.deepcopy(self.gallery_net).eval().requires_grad_(False)
            self.trained, self.trained_net = "gallery_net", self.gallery_net
        else:
            if self.gallery_net is not None:
                self.gallery_net.eval().requires_grad_(False)
            self.trained, self.trained_net = "query_net", self.query_net
        if self.loss_fn is not None:
            check_dims(self.query_net, self.gallery_net, self.loss_fn,
                       "give both the same dim (head: bnneck gives 512-d on both sides)")

    def networks(self) -> Networks:
        return Networks(self.query_net, self.gallery_net, self.trained,
                        self.loss_fn if self.loss_fn is not None else self.supervised, symmetric=self.alone,
                        reference_gallery=self.reference_gallery)

    def _check_classifier(self, net: Encoder, what: str) -> None:
        head = net.head
        if head is None or head.classifier is None:
            raise ConfigError(f"the re-ID recipe needs an identity classifier on {what}: set head: bnneck and "
                              f"num_classes: {self.num_ids} (the training set's identities)")
        if head.classifier.out_features != self.num_ids:
            raise ConfigError(f"{what} has num_classes: {head.classifier.out_features} but the training set "
                              f"has {self.num_ids} identities; set num_classes: {self.num_ids}")

    def _local_grids(self) -> tuple[int, ...]:
        """The cell grids of the loss that reads ``gallery_local`` (UGD's P and P/2), alone or in a loss list."""
        if "gallery_local" not in self.needs:
            return ()
        (grids,) = {tuple(m.local_grids) for m in self.loss_fn.modules() if hasattr(m, "local_grids")}
        return grids

    def param_groups(self, lr: float) -> list[dict]:
        """The optimiser's groups: the trained network's (AML's GeM rule) or, for ACD with ``raho``, RAHO's tiers."""
        if self.co_train and self.cfg.acd.raho:
            return self._raho_groups(lr)
        return trained_param_groups(self.trained_net, self.loss_fn, self.cfg, lr)

    def _raho_groups(self, lr: float) -> list[dict]:
        from asymret.retrieval.pair import weights_hash
        from asymret.training.raho import TIER_NAMES, raho, raho_param_groups, residual_blocks

        a = self.cfg.acd
        path = self.ctx.run_dir / "raho.json"
        measured_on = {"gallery_net": weights_hash(self.trained_net), "query_net": weights_hash(self.query_net),
                       "p": a.raho_p, "gamma": a.raho_gamma, "batches": a.raho_batches, "seed": self.cfg.seed}
        report = json.loads(path.read_text()) if path.is_file() else {}
        if report.get("measured_on") == measured_on:  # resume: the tiers chosen on these starting weights
            tiers = {b["name"]: TIER_NAMES.index(b["tier"]) for b in report["blocks"]}
            return raho_param_groups(self.trained_net, residual_blocks(self.trained_net.backbone), tiers, lr,
                                     report["gamma"])
        sampler = DistillationSampler(len(self.ctx.records), self._distill_size(), num_batches=a.raho_batches,
                                      seed=self.cfg.seed + 7919)
        loader = DataLoader(self._distill_images(), batch_sampler=sampler, num_workers=self.cfg.data.num_workers,
                            collate_fn=list)

        def batches():
            for items, idx in zip(loader, sampler):
                raise_broken(items)
                gal = torch.stack([g for _, g in items])
                low = torch.stack([q for q, _ in items])
                yield gal, low, torch.as_tensor(self.labels[idx])

        groups, report = raho(self.trained_net, batches(), lr, query_net=self.query_net, p=a.raho_p,
                              gamma=a.raho_gamma)
        report["measured_on"] = measured_on  # a later run reuses the tiers only for the same start
        if self.ctx.main:
            self.ctx.run_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1))
        log.info("RAHO: %d of %d blocks at full lr (U_hr ∩ U_cr), written to %s",
                 sum(b["tier"] == "eta" for b in report["blocks"]), len(report["blocks"]), path)
        return groups

    # ------------------------------------------------------------------------------------ epochs

    def _distill_size(self) -> int:
        return min(self.rc.distill_batch_size, len(self.ctx.records))

    def _distill_images(self) -> RecordImages:
        """Distillation images: query resolution (and gallery resolution too when the gallery is trained or runs
        live); with ``distill_augment`` each view through its own draw of the training augmentation."""
        records, rc = self.ctx.records, self.rc

        def view(net):
            if rc.distill_augment:
                return build_reid_train_transform(net.spec.input, rc.flip, rc.pad, rc.erasing)
            return net.transform

        q = view(self.query_net)
        if self.co_train or self.live_gallery:
            g = view(self.gallery_net)
            return RecordImages(records, lambda im: (q(im), g(im)))
        return RecordImages(records, q)

    def loaders(self, epoch: int):
        """The epoch's steps: ``(pk_loader, pk_sampler, distill_loader | None, distill_sampler | None)``."""
        ctx, rc = self.ctx, self.rc
        ids = min(rc.ids_per_batch, self.num_ids)
        pk = IdentitySampler(self.labels, ids, rc.images_per_id, seed=self.cfg.seed, rank=ctx.rank,
                             world_size=ctx.world)
        pk.set_epoch(epoch)
        transform = build_reid_train_transform(self.trained_net.spec.input, rc.flip, rc.pad, rc.erasing)
        kw = {"num_workers": self.cfg.data.num_workers, "collate_fn": list,
              "pin_memory": self.device.type == "cuda"}
        pk_loader = DataLoader(RecordImages(ctx.records, transform), batch_sampler=pk, **kw)
        if self.alone or rc.distill_batch_size == 0:
            return pk_loader, pk, None, None
        ds = DistillationSampler(len(ctx.records), self._distill_size(), num_batches=len(pk), seed=self.cfg.seed,
                                 rank=ctx.rank, world_size=ctx.world)
        ds.set_epoch(epoch)
        return pk_loader, pk, DataLoader(self._distill_images(), batch_sampler=ds, **kw), ds

    def train_mode(self) -> None:
        self.trained_net.train()
        if self.cfg.train.bn_eval:
            set_bn_eval(self.trained_net)
        if self.co_train:
            self.query_net.eval()

    def _loss_batch(self, q, gallery: dict, labels: torch.Tensor, idx: torch.Tensor) -> LossBatch:
        """The distillation loss's batch: exactly the fields it ``needs``, from the query network's output ``q``
        (:class:`~asymret.retrieval.encoders.TrainOutput`) and the gallery side's named tensors."""
        available = {"query": lambda: q.feature, "query_raw": lambda: q.raw, "query_logits": lambda: q.logits,
                     "query_stages": lambda: q.stages, "labels": lambda: labels,
                     "uncertainty": lambda: self.uncertainty[idx], **{k: (lambda v=v: v) for k, v in gallery.items()}}
        return LossBatch(**{name: available[name]() for name in self.needs})

    def _live_gallery_rows(self, images: torch.Tensor) -> dict:
        """The frozen gallery's side of the distillation batch from its own forward pass on its (augmented) view:
        eval mode, no gradient, the same fields as :meth:`_frozen_gallery_rows`."""
        g = self.gallery_net
        with torch.no_grad(), eval_mode(g):
            out = g.forward_train(images)
            rows = {"gallery": out.feature, "gallery_raw": out.raw, "gallery_logits": out.logits}
            if "gallery_local" in self.needs:
                rows["gallery_local"] = tuple(g.local_features(out.fmap, grid) for grid in self._local_grids())
                rows["gallery_local_logits"] = tuple(g.head.classifier(t) for t in rows["gallery_local"])
        return rows

    def _frozen_gallery_rows(self, distill_idx, idx: torch.Tensor) -> dict:
        """The frozen gallery's side of the distillation batch, from the cache (constants, no gradient)."""
        rows = {"gallery": self.gallery_emb[idx]}
        head = self.gallery_net.head
        with torch.no_grad():
            if self.gallery_raw is not None:
                rows["gallery_raw"] = self.gallery_raw[idx]
            if "gallery_logits" in self.needs:
                rows["gallery_logits"] = head.classifier(rows["gallery_raw"])
            if "gallery_local" in self.needs:
                rows["gallery_local"] = tuple(torch.from_numpy(np.asarray(a[np.asarray(distill_idx)], np.float32))
                                              .to(self.device, non_blocking=True) for a in self.gallery_local)
                rows["gallery_local_logits"] = tuple(head.classifier(t) for t in rows["gallery_local"])
        return rows

    def step(self, pk_images: list, pk_idx, distill_items: list | None = None, distill_idx=None) -> LossOutput:
        """One step's loss: the trained network's own loss on the P×K batch plus the distillation terms."""
        dev = self.device
        raise_broken(pk_images)
        out = self.trained_net.forward_train(stack_by_shape(pk_images).to(dev, non_blocking=True))
        labels = torch.as_tensor(self.labels[np.asarray(pk_idx)], device=dev)
        own = self.supervised(LossBatch.own(out.pooled, out.logits, labels))
        total, parts = own.total, {f"own_{k}": v for k, v in own.parts.items()}
        if distill_items is None:
            return LossOutput(total, parts)
        raise_broken(distill_items)
        idx = torch.as_tensor(np.asarray(distill_idx), device=dev)
        d_labels = torch.as_tensor(self.labels[np.asarray(distill_idx)], device=dev)
        if self.co_train:
            low = stack_by_shape([q for q, _ in distill_items]).to(dev, non_blocking=True)
            high = stack_by_shape([g for _, g in distill_items]).to(dev, non_blocking=True)
            with torch.no_grad(), eval_mode(self.query_net):
                q = self.query_net.forward_train(low)
            g = self.trained_net.forward_train(high)
            batch = self._loss_batch(q, {"gallery": g.feature, "gallery_raw": g.raw, "gallery_logits": g.logits},
                                     d_labels, idx)
            base = self.loss_fn(batch)
            collab = self.trained_net.head.classifier(0.5 * (g.raw + q.raw))
            acd = self.acd(LossBatch(query_logits=q.logits, gallery_logits=g.logits, collab_logits=collab))
            total = total + self.cfg.acd.base_weight * base.total + acd.total
            parts.update({"base": base.total.detach(), **{f"base_{k}": v for k, v in base.parts.items()},
                          **{f"acd_{k}": v for k, v in acd.parts.items()}})
            return LossOutput(total, parts)
        if self.live_gallery:
            low = stack_by_shape([a for a, _ in distill_items]).to(dev, non_blocking=True)
            gallery = self._live_gallery_rows(stack_by_shape([b for _, b in distill_items]).to(dev, non_blocking=True))
        else:
            low = stack_by_shape(distill_items).to(dev, non_blocking=True)
            gallery = self._frozen_gallery_rows(distill_idx, idx)
        q = self.trained_net.forward_train(low, stages="query_stages" in self.needs)
        base = self.loss_fn(self._loss_batch(q, gallery, d_labels, idx))
        parts.update({"distill": base.total.detach(), **{f"distill_{k}": v for k, v in base.parts.items()}})
        return LossOutput(total + base.total, parts)
