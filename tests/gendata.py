"""Generated twins of the real ground-truth files in ``shared/data``: same file names, same formats, same
sizes, made-up content. Every test that reads the real files runs on this twin too (the ``real_data``
fixture in ``tests/conftest.py``), so a clone without ``../shared`` still exercises the same code.

The official index files are computed here by the rule VeRi's ``compute_AP.m`` documents (same identity:
other camera is a positive, same camera is junk, the query itself included), written as the official files
are (1-based, space-separated, one line per query, trailing space).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from asymret.mini.benchmark import veri_gt  # the official rule, as the mini renderer writes it

# name: (database images, queries without an easy positive), as in the real revisitop pickles
REVISITED = {"roxford5k": (4993, 2), "rparis6k": (6322, 0)}
REVISITED_QUERIES = 70
VERI_QUERIES, VERI_TEST, VERI_TRAIN, VERI_TRAIN_IDS, VERI_TEST_IDS = 1678, 11579, 37778, 576, 200


def revisited_gnd(n_db: int, no_easy: int, seed: int) -> dict:
    """A revisitop ground truth (``imlist``, ``qimlist``, ``gnd`` of ``bbx``/``easy``/``hard``/``junk``) in
    plain lists and ints, like ``gnd_roxford5k.pkl``: every query has a hard positive, ``no_easy`` have no
    easy one."""
    rng = np.random.default_rng(seed)
    gnd = []
    for q in range(REVISITED_QUERIES):
        n_easy = 0 if q < no_easy else int(rng.integers(1, 40))
        n_hard, n_junk = int(rng.integers(1, 40)), int(rng.integers(0, 30))
        picked = rng.choice(n_db, n_easy + n_hard + n_junk, replace=False)
        easy, hard, junk = np.split(picked, [n_easy, n_easy + n_hard])
        x, y = rng.uniform(0, 300, 2).round(1)
        w, h = rng.uniform(50, 400, 2).round(1)
        gnd.append({"bbx": [float(x), float(y), float(x + w), float(y + h)], "easy": sorted(map(int, easy)),
                    "hard": sorted(map(int, hard)), "junk": sorted(map(int, junk))})
    order = rng.permutation(REVISITED_QUERIES)  # the no-easy queries anywhere, as in the real files
    return {"gnd": [gnd[i] for i in order], "imlist": [f"db_{i:06d}" for i in range(n_db)],
            "qimlist": [f"query_{i:03d}" for i in range(REVISITED_QUERIES)]}


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def veri_lists(seed: int) -> dict[str, list[str]]:
    """VeRi-776 name lists (``name_train/query/test.txt``, ``name_train_labeled.txt``) of the real sizes:
    train and test identities disjoint, one query per (identity, camera) of the test set, all sorted."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1, 777))
    test_ids, train_ids = sorted(ids[:VERI_TEST_IDS]), sorted(ids[VERI_TEST_IDS:VERI_TEST_IDS + VERI_TRAIN_IDS])
    frame = iter(range(10_000, 10_000_000, 5))
    pairs = [(int(i), int(c)) for i, n_cams in zip(test_ids, _split(VERI_QUERIES, VERI_TEST_IDS))
             for c in sorted(rng.choice(np.arange(1, 21), n_cams, replace=False))]
    test, query = [], []
    for (identity, cam), n in zip(pairs, _split(VERI_TEST, len(pairs))):
        names = [f"{identity:04d}_c{cam:03d}_{next(frame):08d}_{k % 2}.jpg" for k in range(n)]
        query.append(names[0])
        test += names
    train = [f"{int(i):04d}_c{int(rng.integers(1, 21)):03d}_{next(frame):08d}_0.jpg"
             for i, n in zip(train_ids, _split(VERI_TRAIN, VERI_TRAIN_IDS)) for _ in range(n)]
    train.sort()
    label = {int(i): k for k, i in enumerate(train_ids)}
    return {"train": train, "query": sorted(query), "test": sorted(test),
            "train_labeled": [f"{n} {label[int(n[:4])]}" for n in sorted(train)]}


def write_shared_twin(data: Path, seed: int = 0) -> Path:
    """Write ``revisited/gnd_*.pkl`` and ``veri776/*.txt`` under ``data`` exactly where ``shared/data`` has
    them; returns ``data``."""
    (data / "revisited").mkdir(parents=True, exist_ok=True)
    for k, (name, (n_db, no_easy)) in enumerate(REVISITED.items()):
        (data / "revisited" / f"gnd_{name}.pkl").write_bytes(pickle.dumps(revisited_gnd(n_db, no_easy, seed + k)))
    veri = data / "veri776"
    veri.mkdir(exist_ok=True)
    lists = veri_lists(seed)
    for part, names in lists.items():
        (veri / f"name_{part}.txt").write_text("\n".join(names) + "\n")
    for file, rows in zip(("gt_index.txt", "jk_index.txt"), veri_gt(lists["test"], lists["query"])):
        file_text = "".join(" ".join(map(str, row)) + " \n" for row in rows)
        (veri / file).write_text(file_text)
    return data
