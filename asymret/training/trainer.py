"""Train a query network into the space of a frozen gallery network (AML), or alone (symmetric).

A run folder (DESIGN.md)::

    runs/<name>/config.yaml         the resolved config
    runs/<name>/metrics.jsonl       one JSON line per epoch: loss and its parts, lr, validation
    runs/<name>/checkpoints/last.pt model, optimiser, scheduler, RNG and epoch: exact resume
    runs/<name>/checkpoints/best.pt the query network with the best validation mAP
    runs/<name>/query_net.pt        the final query network (an encoder checkpoint, usable as weights:)
    runs/<name>/pair.pt             both encoders' specs and weights: all ``asymret serve`` needs

Every epoch's randomness (pair sampling, mining pool, data order) is drawn from ``(seed, epoch)``,
so a resumed run repeats exactly the epochs an uninterrupted run would have.
Data parallel through ``torchrun``: each rank trains on its share of the epoch's tuples and the
gradients are averaged across ranks before every optimiser step (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from asymret.config import dump_config
from asymret.errors import AsymretError, ConfigError, TrainingError
from asymret.index.files import atomic_write
from asymret.retrieval.cache import EmbeddingCache
from asymret.retrieval.checkpoints import load_torch_file, read_checkpoint_whitening
from asymret.retrieval.encode import RecordImages, encode_records, shape_groups
from asymret.retrieval.encoders import Encoder, create_encoder, encoder_checkpoint, set_bn_eval
from asymret.retrieval.evaluate import evaluate_pair
from asymret.retrieval.pair import save_pair
from asymret.retrieval.transforms import build_train_transform
from asymret.training.config import DataConfig, ExperimentConfig
from asymret.training.losses import LossBatch, build_loss, combined_needs, loss_infos
from asymret.training.mining import Tuples, mine_negatives, sample_pairs
from asymret.training.reid import uses_reid_recipe
from asymret.training.tensorboard import log_scalars

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- helpers


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but CUDA is not available; use auto or cpu")
    return device


def forward_images(net: Encoder, images: list[torch.Tensor], device) -> torch.Tensor:
    """Training-mode embeddings of preprocessed images that may differ in size (grouped by shape)."""
    parts, order = [], []
    for rows in shape_groups(images):
        parts.append(net(torch.stack([images[i] for i in rows]).to(device, non_blocking=True)))
        order.extend(rows)
    out = torch.cat(parts)
    return out[torch.argsort(torch.as_tensor(order, device=out.device))]


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


# ------------------------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path | None = None, progress: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir or Path(cfg.output_dir) / cfg.name)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = resolve_device(cfg.train.device)
        if self.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0
        self.progress = progress and self.main
        self.amp = cfg.train.amp and self.device.type == "cuda"
        self._seed(cfg.seed)

        self.data = open_training_set(cfg.data)
        self.records = self.data.records
        self.labels = np.asarray(self.data.labels)
        infos = loss_infos(cfg.loss.names)  # an unknown name is the ConfigError that lists the known ones
        needs = combined_needs(cfg.loss.names)
        self.tuple_mode = "negative" in needs or "positive" in needs
        self.symmetric = cfg.loss.mode == "symmetric"
        self.gallery_emb = None
        self.recipe = None
        if uses_reid_recipe(cfg):
            self._init_reid()
            return
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
        self.gallery_net = None
        self.trained, self.net = "query_net", self.query_net
        if not self.symmetric:
            self.gallery_net = create_encoder(cfg.gallery_net).to(self.device).eval()
            self.gallery_net.requires_grad_(False)
            if self.query_net.dim != self.gallery_net.dim and not list(self.loss_fn.parameters()):
                raise ConfigError(f"query_net gives {self.query_net.dim}-d embeddings but gallery_net gives "
                                  f"{self.gallery_net.dim}-d; set query_net.dim: {self.gallery_net.dim}")
            self.gallery_emb = self._gallery_embeddings()

        o = cfg.train.optim
        params = self.query_net.param_groups(o.lr, o.gem_lr_mult, o.head_lr_mult)
        if list(self.loss_fn.parameters()):
            params.append({"params": list(self.loss_fn.parameters()), "lr": cfg.train.optim.lr})
        self._init_optimizer(params)

    def _init_reid(self) -> None:
        """The re-ID recipe (:mod:`asymret.training.reid`) builds the networks and losses."""
        from asymret.training.reid import ReIDRecipe

        self.recipe = ReIDRecipe(self)
        self.symmetric = self.recipe.alone
        self.trained, self.net = self.recipe.trained, self.recipe.trained_net
        self._init_optimizer(self.recipe.param_groups(self.cfg.train.optim.lr))

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

    # -------------------------------------------------------------------------------------- setup

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _gallery_embeddings(self) -> torch.Tensor:
        """The frozen gallery network's embedding of every training image, computed once (rank 0)."""
        cache = EmbeddingCache(Path(self.cfg.output_dir) / ".cache")
        kw = {"batch_size": 32, "num_workers": self.cfg.data.num_workers, "device": self.device,
                  "progress": self.progress}
        if self.main:
            emb = cache.get(self.gallery_net, self.records, **kw)
        if self.world > 1:
            dist.barrier()
        if not self.main:
            emb = cache.get(self.gallery_net, self.records, **kw)
        return torch.from_numpy(np.array(emb, dtype=np.float32)).to(self.device)

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
        qidxs = getattr(self.data, "qidxs", None)
        pidxs = getattr(self.data, "pidxs", None)
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
        """(image indices per step, builder of the LossBatch from their query-side embeddings)."""
        t = self.cfg.train
        if self.tuple_mode:
            tuples = self.make_tuples(rng)
            mine = np.arange(self.rank, len(tuples), self.world)
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
        needed = per_step * n_steps * self.world
        order = np.concatenate([rng.permutation(n) for _ in range(-(-needed // n))])
        picks = [order[(i * self.world + self.rank) * per_step:][:per_step] for i in range(n_steps)]
        return [(p, None) for p in picks if len(p) > 1]

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

    def _epoch_steps(self):
        """This epoch's steps as ``(count, iterator of zero-argument loss computations)``."""
        cfg, t = self.cfg, self.cfg.train
        if self.recipe is not None:
            pk_loader, pk, d_loader, ds = self.recipe.loaders(self.epoch)
            self.recipe.train_mode()
            if d_loader is None:
                steps = ((lambda im=im, ix=ix: self.recipe.step(im, ix, None, None)) for im, ix in zip(pk_loader, pk))
            else:
                steps = ((lambda im=im, ix=ix, d=d, dx=dx: self.recipe.step(im, ix, d, dx))
                         for im, ix, d, dx in zip(pk_loader, pk, d_loader, ds))
            return len(pk), steps
        rng = np.random.default_rng([cfg.seed, self.epoch])
        plans = self._steps(rng)
        self.query_net.train()
        if t.bn_eval:
            set_bn_eval(self.query_net)
        loader = self._loader(np.concatenate([p[0] for p in plans]), [len(p[0]) for p in plans])

        def compute(images, indices, tup):
            for item in images:  # a broken image comes back as its error, not a worker traceback
                if isinstance(item, AsymretError):
                    raise item
            return self.loss_fn(self._batch(images, indices, tup))

        return len(plans), ((lambda im=im, ix=ix, tp=tp: compute(im, ix, tp)) for im, (ix, tp) in zip(loader, plans))

    def train_epoch(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        torch.manual_seed(cfg.seed * 100_003 + self.epoch)
        n_steps, steps = self._epoch_steps()
        totals: dict[str, float] = {}
        count = 0
        bar = tqdm(steps, total=n_steps, desc=f"epoch {self.epoch + 1}/{t.epochs}",
                   disable=not self.progress, unit="step", leave=False)
        self.optimizer.zero_grad(set_to_none=True)
        # A loss that sums over the step's tuples (AML's, as in its code) keeps summing across processes and
        # accumulated steps, so any split of the tuples gives the same gradient; a mean-reduced loss averages.
        sums = self.recipe is None and getattr(self.loss_fn, "batch_reduction", "mean") == "sum"
        scale = float(self.world) if sums else 1.0 / t.accumulate
        for step, compute in enumerate(bar):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                out = compute()
            loss = out.total.float()
            if not torch.isfinite(loss):
                parts = ", ".join(f"{k}={float(v):.4g}" for k, v in out.parts.items())
                raise TrainingError(f"loss became {loss.item()} at epoch {self.epoch + 1}, step {step + 1}"
                                    f"{' (' + parts + ')' if parts else ''}; lower train.optim.lr or check "
                                    "the data; the last good checkpoint is kept")
            (loss * scale).backward()
            if (step + 1) % t.accumulate == 0 or step + 1 == n_steps:
                self._average_gradients()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            count += 1
            totals["loss"] = totals.get("loss", 0.0) + loss.item()
            for k, v in out.parts.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            bar.set_postfix(loss=f"{totals['loss'] / count:.4f}")
        self.scheduler.step()
        return {k: v / max(count, 1) for k, v in totals.items()}

    def _average_gradients(self) -> None:
        if self.world == 1:
            return
        for group in self.optimizer.param_groups:  # the trained network's and a loss's own (projectors)
            for p in group["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world

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
                "recipe": "reid" if self.recipe is not None else "aml"}
        if self.trained == "gallery_net":
            meta["acd"] = True
            reference = self.recipe.reference_gallery
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
            embeddings["gallery_net"] = EmbeddingCache(Path(cfg.output_dir) / ".cache").get(
                frozen, self.records, batch_size=32, num_workers=cfg.data.num_workers, device=self.device,
                progress=self.progress)
        source = cfg.data.pkl or cfg.data.csv or cfg.data.root
        networks = {name: n.to(self.device).eval() for name, n in networks.items()}
        return learn_whitenings(networks, self.data, cfg.whitening, seed=cfg.seed, embeddings=embeddings,
                                source_name=f"{cfg.data.format} {source}", device=self.device,
                                num_workers=cfg.data.num_workers, progress=self.progress)


def train(cfg: ExperimentConfig, resume: bool = False, progress: bool = True) -> Path:
    return Trainer(cfg, progress=progress).fit(resume=resume)
