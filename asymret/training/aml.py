"""The AML recipe (methods.md §2): a query network trained into the space of a frozen gallery network, or alone
(symmetric), on mined tuples or on batches of random images.

* **tuple losses** (``positive``/``negative`` in ``needs``: contrastive, contr_plus, triplet, ...): each epoch
  draws anchor-positive pairs and mines hard negatives from a random pool, in the gallery network's cached
  space (asymmetric) or the query network's own (symmetric). Only the anchors go through the query network
  when asymmetric; the positives and negatives are cached gallery embeddings.
* **relational / regression losses** (regression, rkd, darkrank): batches of random images, the query
  network's embedding against the cached gallery embedding of the same images.

Every epoch's randomness (pair sampling, mining pool, data order) is drawn from ``(seed, epoch)``; each
process takes every ``world``-th tuple.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader

from asymret.errors import ConfigError
from asymret.retrieval.encode import RecordImages, encode_records, shape_groups
from asymret.retrieval.encoders import Encoder, create_encoder, set_bn_eval
from asymret.retrieval.transforms import build_train_transform
from asymret.training.losses import LossBatch, LossOutput, build_loss, combined_needs, loss_infos
from asymret.training.mining import Tuples, mine_negatives, sample_pairs
from asymret.training.recipe import (
    Networks,
    Recipe,
    RecipeContext,
    check_dims,
    raise_broken,
    trained_param_groups,
)


def forward_images(net: Encoder, images: list[torch.Tensor], device) -> torch.Tensor:
    """Training-mode embeddings of preprocessed images that may differ in size (grouped by shape)."""
    parts, order = [], []
    for rows in shape_groups(images):
        parts.append(net(torch.stack([images[i] for i in rows]).to(device, non_blocking=True)))
        order.extend(rows)
    out = torch.cat(parts)
    return out[torch.argsort(torch.as_tensor(order, device=out.device))]


class AMLRecipe(Recipe):
    """AML tuples or random-image batches through the query network (see the module doc)."""

    name = "aml"

    def __init__(self, ctx: RecipeContext):
        self.ctx = ctx
        cfg = self.cfg = ctx.cfg
        self.device = ctx.device
        self.records, self.labels = ctx.records, ctx.labels
        infos = loss_infos(cfg.loss.names)  # an unknown name is the ConfigError that lists the known ones
        needs = combined_needs(cfg.loss.names)
        self.tuple_mode = "negative" in needs or "positive" in needs
        self.symmetric = cfg.loss.mode == "symmetric"
        distillers = [i.name for i in infos if not {"positive", "negative"} & set(i.needs)]
        if self.symmetric and distillers:
            raise ConfigError(f"loss '{distillers[0]}' distils from a gallery network; it has no symmetric "
                              "mode (set loss.mode: asymmetric)")
        # AML batches: tuples (anchor, its gallery embedding, positive, negatives) or random images with labels
        provided = {"query", "gallery", "positive", "negative"} if self.tuple_mode else {"query", "gallery", "labels"}
        for info in infos:
            extra = sorted(set(info.needs) - provided)
            if extra:
                batches = "tuples" if self.tuple_mode else "batches of random images"
                raise ConfigError(f"loss '{info.name}' needs {', '.join(extra)}, which the AML recipe's {batches} do not "
                                  "provide; train it with train.recipe: reid (or auto), apart from AML tuple losses")

        self.query_net = create_encoder(cfg.query_net).to(self.device)
        self.loss_fn = build_loss(cfg.loss.specs()).to(self.device)
        self.batch_reduction = getattr(self.loss_fn, "batch_reduction", "mean")
        self.gallery_net = None
        if not self.symmetric:
            self.gallery_net = create_encoder(cfg.gallery_net).to(self.device).eval()
            self.gallery_net.requires_grad_(False)
            check_dims(self.query_net, self.gallery_net, self.loss_fn, f"set query_net.dim: {self.gallery_net.dim}")
            self.gallery_emb = ctx.gallery_embeddings(self.gallery_net)

    def networks(self) -> Networks:
        return Networks(self.query_net, self.gallery_net, "query_net", self.loss_fn, symmetric=self.symmetric)

    def param_groups(self, lr: float) -> list[dict]:
        return trained_param_groups(self.query_net, self.loss_fn, self.cfg, lr)

    # ------------------------------------------------------------------------------------- epochs

    def _loader(self, indices: np.ndarray, step_sizes: list[int]) -> DataLoader:
        """Query-side images of ``indices`` in order, one list per step."""
        bounds = np.cumsum([0] + step_sizes)
        batches = [list(range(bounds[i], bounds[i + 1])) for i in range(len(step_sizes))]
        records = [self.records[i] for i in indices]
        transform = build_train_transform(self.query_net.spec.input, self.cfg.data.augment)
        return DataLoader(RecordImages(records, transform), batch_sampler=batches,
                          num_workers=self.cfg.data.num_workers, collate_fn=list,
                          pin_memory=self.device.type == "cuda")

    def _embed_for_mining(self, indices: np.ndarray) -> np.ndarray:
        return encode_records(self.query_net, [self.records[i] for i in indices], batch_size=32,
                              num_workers=self.cfg.data.num_workers, device=self.device, progress=False)

    def make_tuples(self, rng: np.random.Generator) -> Tuples:
        m = self.cfg.train.mining
        qidxs = getattr(self.ctx.data, "qidxs", None)
        pidxs = getattr(self.ctx.data, "pidxs", None)
        anchors, positives = sample_pairs(self.labels, m.tuples_per_epoch, rng, qidxs, pidxs)
        pool = rng.choice(len(self.records), size=min(m.pool_size, len(self.records)), replace=False)
        if m.num_negatives == 0:
            return Tuples(anchors, positives, np.empty((len(anchors), 0), np.int64))
        anchor_emb = self._embed_for_mining(anchors)
        pool_emb = (self._embed_for_mining(pool) if self.symmetric
                    else self.gallery_emb[torch.as_tensor(pool, device=self.device)].cpu().numpy())
        negatives = mine_negatives(anchor_emb, self.labels[anchors], pool, pool_emb, self.labels[pool],
                                   m.num_negatives)
        return Tuples(anchors, positives, negatives)

    def _steps(self, rng: np.random.Generator):
        """(image indices per step, the step's tuple ``(anchors, positives, negatives)`` or None)."""
        t, rank, world = self.cfg.train, self.ctx.rank, self.ctx.world
        if self.tuple_mode:
            tuples = self.make_tuples(rng)
            mine = np.arange(rank, len(tuples), world)
            steps = [mine[i:i + t.batch_size] for i in range(0, len(mine), t.batch_size)]
            plans = []
            for s in steps:
                a, p, n = tuples.anchors[s], tuples.positives[s], tuples.negatives[s]
                images = np.concatenate([a, p, n.ravel()]) if self.symmetric else a
                plans.append((images, (a, p, n)))
            return plans
        per_step = t.batch_size * (2 + t.mining.num_negatives)
        n_steps = math.ceil(t.mining.tuples_per_epoch / t.batch_size)
        n = len(self.records)
        needed = per_step * n_steps * world
        order = np.concatenate([rng.permutation(n) for _ in range(-(-needed // n))])
        picks = [order[(i * world + rank) * per_step:][:per_step] for i in range(n_steps)]
        return [(p, None) for p in picks if len(p) > 1]

    def loaders(self, epoch: int):
        """``(image loader, plans)``: each step's query-side images and its ``(indices, tuple | None)``."""
        plans = self._steps(np.random.default_rng([self.cfg.seed, epoch]))
        loader = self._loader(np.concatenate([p[0] for p in plans]), [len(p[0]) for p in plans])
        return loader, plans

    def train_mode(self) -> None:
        self.query_net.train()
        if self.cfg.train.bn_eval:
            set_bn_eval(self.query_net)

    def _batch(self, images: list[torch.Tensor], indices: np.ndarray, tup) -> LossBatch:
        q = forward_images(self.query_net, images, self.device)
        if tup is None:  # relational / regression: the B images on both sides
            return LossBatch(query=q, gallery=self.gallery_emb[torch.as_tensor(indices, device=self.device)],
                             labels=torch.as_tensor(self.labels[indices], device=self.device))
        a, p, n = tup
        b, k = len(a), n.shape[1]
        if self.symmetric:
            # explicit sizes: with no negatives (k = 0, the Table 5 ablations) -1 could be anything
            q_a, q_p, q_n = q[:b], q[b:2 * b], q[2 * b:].reshape(b, k, q.shape[1])
            return LossBatch(query=q_a, gallery=q_a, positive=q_p[:, None], negative=q_n)
        g = self.gallery_emb

        def take(ix):
            return g[torch.as_tensor(ix, device=self.device)]

        return LossBatch(query=q, gallery=take(a), positive=take(p)[:, None],
                         negative=take(n.reshape(-1)).reshape(b, k, g.shape[1]))

    def step(self, images: list, plan) -> LossOutput:
        """One step's loss: ``images`` (the loader's list) and ``plan`` (their indices and tuple)."""
        raise_broken(images)
        indices, tup = plan
        return self.loss_fn(self._batch(images, indices, tup))
