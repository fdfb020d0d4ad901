"""Learning a pair's whitenings from a training set: at the end of training and in ``asymret whiten``.

cirtorch and AML learn the post-processing whitening ``Lw`` of each network from matching image pairs
(:mod:`asymret.retrieval.whitening` has the formula): SfM-120k's query/positive pairs ``qidxs``/``pidxs``,
or, for data with labels only, each image paired with a random other image of its label. Every network
of the pair gets its own whitening, learned on its own embeddings of the same images: the gallery
network's serves asymmetric testing (both sides), the query network's its symmetric rows.
"""

from __future__ import annotations

import logging

import numpy as np

from asymret.errors import ConfigError, DataError
from asymret.retrieval.whitening import Whitening, learn_encoder_whitening
from asymret.training.config import WhiteningConfig
from asymret.training.mining import sample_pairs

log = logging.getLogger(__name__)


def whitening_pairs(data, pairs: str = "auto", max_pairs: int | None = None, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """``(qidxs, pidxs, source)``: the matching pairs of a training set (a reader of
    :mod:`asymret.retrieval.datasets`), ``source`` saying which kind (``"sfm"`` or ``"labels"``).

    ``sfm``: the set's own ``qidxs``/``pidxs`` (SfM-120k). ``labels``: every image that shares its label
    with another, paired with a random one of those (one pair per image, drawn from ``seed``). ``auto``:
    sfm when the set has them. ``max_pairs``: a random subset of that many (also from ``seed``).
    """
    rng = np.random.default_rng([seed, 7])
    qidxs, pidxs = getattr(data, "qidxs", None), getattr(data, "pidxs", None)
    if pairs == "sfm" or (pairs == "auto" and qidxs is not None):
        if qidxs is None:
            raise ConfigError("whitening.pairs: sfm needs SfM-120k's qidxs/pidxs, which this training set "
                              "does not have; use pairs: labels (or auto)")
        q, p, source = np.asarray(qidxs, dtype=np.int64), np.asarray(pidxs, dtype=np.int64), "sfm"
    elif pairs in ("labels", "auto"):
        labels = np.asarray(data.labels)
        try:
            q, p = sample_pairs(labels, len(labels), rng)
        except DataError:
            raise DataError("no label of the training set has two images, so there is no matching pair to learn "
                            "a whitening from; use whitening.kind: pca (asymret whiten --kind pca)") from None
        order = np.argsort(q, kind="stable")  # image order, not the sampler's
        q, p, source = q[order], p[order], "labels"
    else:
        raise ConfigError(f"unknown whitening.pairs {pairs!r}; choose auto, sfm or labels")
    if max_pairs is not None and max_pairs < len(q):
        keep = np.sort(rng.choice(len(q), size=max_pairs, replace=False))
        q, p = q[keep], p[keep]
    return q, p, source


def learn_whitenings(networks: dict, data, cfg: WhiteningConfig, *, seed: int = 0, embeddings: dict | None = None,
                     source_name: str = "", device=None, num_workers: int = 0, progress: bool = False
                     ) -> dict[str, Whitening]:
    """Each network's whitening from the pairs of ``data`` (:func:`whitening_pairs`).

    ``networks``: ``{pair-file name ("query_net", "gallery_net", "reference_gallery_net"): Encoder}``; one
    network given under two names (a symmetric run's) is learned once. ``embeddings``: ``{name: (N, D)
    array}`` of a network's embeddings of all of ``data``'s records when they are at hand (a frozen
    gallery network's cache), so it never encodes them again. ``source_name``: where the data came from,
    for the whitening's provenance.
    """
    embeddings = embeddings or {}
    if cfg.kind == "pca":  # no pairs: every image (at most max_pairs of them, at random)
        n = len(data.records)
        q = np.arange(n) if cfg.max_pairs is None or cfg.max_pairs >= n else \
            np.sort(np.random.default_rng([seed, 7]).choice(n, size=cfg.max_pairs, replace=False))
        p, kind_of_pairs = None, "images"
    else:
        q, p, kind_of_pairs = whitening_pairs(data, cfg.pairs, cfg.max_pairs, seed)
    info = {"learned_on": source_name, "pair_source": kind_of_pairs}
    out: dict[str, Whitening] = {}
    done: dict[int, Whitening] = {}
    for name, net in networks.items():
        if id(net) in done:
            out[name] = done[id(net)]
            continue
        log.info("learning the %s's %s whitening from %d %s", name, cfg.kind, len(q),
                 "images" if p is None else f"{kind_of_pairs} pairs")
        white = learn_encoder_whitening(net, data.records, q, p, kind=cfg.kind, dim=cfg.dim,
                                        embeddings=embeddings.get(name), info=info,
                                        batch_size=cfg.batch_size, num_workers=num_workers, device=device,
                                        progress=progress)
        out[name] = done[id(net)] = white
    return out
