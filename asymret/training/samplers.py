"""Batch samplers of the re-ID recipe (D3still/ACD, methods.md §3): P×K identity batches for the trained
network's own loss, random image batches for distillation.

Both are ``torch.utils.data.Sampler`` objects that yield one list of dataset indices per step (pass them
as ``DataLoader(batch_sampler=...)``). An epoch's batches are drawn from ``(seed, epoch)`` alone
(``set_epoch``), so a resumed run repeats the epochs an uninterrupted one would have seen. With
``world_size`` ranks, rank ``r`` takes batches ``r, r + world, ...`` of the epoch's plan and every rank
gets the same number of steps (the plan's last ``len % world`` batches are dropped), so each rank's
batch is a whole P×K batch and the shards are disjoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from asymret.errors import ConfigError, DataError

# Distinct random streams for the two samplers, so equal seeds do not give correlated draws.
IDENTITY_STREAM, DISTILLATION_STREAM = 0, 1


def epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


def identity_chunks(members: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """One identity's images shuffled, padded to a multiple of K and cut into ``(ceil(n/K), K)`` chunks.

    Fewer than K images: padded by drawing with replacement (fast-reid ``NaiveIdentitySampler``), after
    taking each image once. Otherwise the last chunk is completed with other images of the identity
    (distinct ones), so no chunk repeats an image and no image is left out.
    """
    order = rng.permutation(members)
    short = -len(order) % k
    if len(order) < k:
        fill = rng.choice(order, size=short, replace=True)
    else:
        fill = rng.choice(order[: len(order) + short - k], size=short, replace=False)
    return np.concatenate([order, fill]).reshape(-1, k)


def identity_batches(labels: np.ndarray, p: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """An epoch of P×K batches: P distinct identities, K images of each, every image at least once.

    Each identity's images are cut into chunks of K (:func:`identity_chunks`); each batch takes one chunk
    from each of P identities drawn without replacement in proportion to their chunks left (fast-reid
    draws uniformly, which leaves the largest identities' last chunks unused). When fewer than P
    identities have chunks left, the batch is completed with fresh chunks of other identities.
    """
    ids, inverse = np.unique(labels, return_inverse=True)
    if len(ids) < p:
        raise DataError(f"a P×K batch needs {p} identities but the training set has {len(ids)}; "
                        f"lower ids_per_batch to at most {len(ids)}")
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    chunks = [list(identity_chunks(m, k, rng)) for m in members]
    left = np.array([len(c) for c in chunks])
    batches = []
    while left.any():
        open_ids = np.flatnonzero(left)
        if len(open_ids) >= p:
            picked = rng.choice(open_ids, size=p, replace=False, p=left[open_ids] / left[open_ids].sum())
            filler = []
        else:
            picked = open_ids
            others = np.setdiff1d(np.arange(len(ids)), open_ids)
            filler = [identity_chunks(members[i], k, rng)[0] for i in rng.choice(others, p - len(picked), replace=False)]
        left[picked] -= 1
        batches.append(np.concatenate([chunks[i].pop() for i in picked] + filler))
    return batches


def shard(batches: list, rank: int, world_size: int) -> list:
    """Rank ``rank``'s batches: every ``world_size``-th, the same count on every rank."""
    usable = len(batches) // world_size * world_size
    return batches[rank:usable:world_size]


class _EpochBatchSampler(Sampler[list[int]]):
    def __init__(self, seed: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}; launch with torchrun")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self._plan: tuple[int, list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_batches(self) -> list[np.ndarray]:
        """This rank's batches of the current epoch (computed once per epoch)."""
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, shard(self.plan(self.epoch), self.rank, self.world_size))
        return self._plan[1]

    def plan(self, epoch: int) -> list[np.ndarray]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        return (batch.tolist() for batch in self.epoch_batches())

    def __len__(self) -> int:
        return len(self.epoch_batches())


class IdentitySampler(_EpochBatchSampler):
    """P×K batches (P = 16 identities × K = 6 images) for CE + batch-hard triplet (methods.md §3).

    ``labels``: the identity of every dataset index. See :func:`identity_batches` for how an epoch is
    drawn; with several ranks each rank's step is one whole P×K batch.
    """

    def __init__(self, labels, ids_per_batch: int = 16, images_per_id: int = 6, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        super().__init__(seed, rank, world_size)
        if ids_per_batch < 1 or images_per_id < 1:
            raise ConfigError("ids_per_batch and images_per_id must be at least 1, e.g. 16 and 6")
        self.labels = np.asarray(labels)
        self.p, self.k = ids_per_batch, images_per_id

    def plan(self, epoch: int) -> list[np.ndarray]:
        return identity_batches(self.labels, self.p, self.k, epoch_rng(self.seed, epoch, IDENTITY_STREAM))


class DistillationSampler(_EpochBatchSampler):
    """Random batches of distinct images for the distillation stream (256 by default, methods.md §3).

    ``num_batches`` is the number of steps per rank and epoch, e.g. ``len(identity_sampler)`` to pair
    one distillation batch with each P×K batch; by default one pass over the images across all ranks.
    Each pass over the data is a fresh permutation cut into whole batches, so no batch repeats an image.
    """

    def __init__(self, num_images: int, batch_size: int = 256, *, num_batches: int | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(seed, rank, world_size)
        if batch_size > num_images:
            raise DataError(f"a distillation batch of {batch_size} needs at least that many images but the "
                            f"training set has {num_images}; lower the distillation batch size")
        self.num_images, self.batch_size = num_images, batch_size
        self.per_pass = num_images // batch_size
        self.num_batches = num_batches if num_batches is not None else max(1, self.per_pass // world_size)

    def plan(self, epoch: int) -> list[np.ndarray]:
        rng = epoch_rng(self.seed, epoch, DISTILLATION_STREAM)
        needed = self.num_batches * self.world_size
        passes = [rng.permutation(self.num_images)[: self.per_pass * self.batch_size]
                  for _ in range(math.ceil(needed / self.per_pass))]
        return list(np.concatenate(passes).reshape(-1, self.batch_size)[:needed])
