"""Ranked lists kept from an evaluation: what a picture of its best and worst queries needs.

``asymret evaluate --save-ranks DIR`` hands a :class:`RankRecorder` to
:func:`asymret.retrieval.evaluate.evaluate_pair` (its ``on_row`` hook), so the rankings come from the very
features the rows are scored on, encoded once. Per row it keeps each query's top-``k`` database ids and
scores and its AP (the metrics' ``per_query=True``); per query the image path (and ``bbx``) and the
protocol's positives and junk (revisited: Medium, easy + hard positive; re-ID: same identity on another
camera positive, on the same camera junk). ``DIR/ranks.json`` holds it all; top-k arrays of more than
:data:`INLINE_LIMIT` entries go beside it as ``.npy`` files. Database paths are stored only for the ids
that appear in some top-``k`` (an R1M database stays a few kilobytes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from asymret.errors import DataError, InputError
from asymret.retrieval import metrics

DEFAULT_K = 20
INLINE_LIMIT = 100_000  # top-k entries (queries x k) per row written inline in ranks.json
RANKS_FILE = "ranks.json"
FORMAT_VERSION = 1


class RankRecorder:
    """An ``on_row`` hook for ``evaluate_pair``: top-``k`` ids and per-query AP of every row it sees.

    ``topk``: the same index top-k ranking the evaluation uses (``--topk``), so the saved APs are the
    evaluation's; ``None`` ranks exactly.
    """

    def __init__(self, benchmark: str, root, distractors=None, k: int = DEFAULT_K, topk: int | None = None):
        from asymret.retrieval.datasets import RevisitedDataset, VeRi776
        from asymret.retrieval.evaluate import ACD_BENCHMARKS, REID_BENCHMARKS, REVISITED_BENCHMARKS

        if k < 1:
            raise InputError(f"the number of ranked images to keep must be at least 1, got {k}")
        self.benchmark, self.k, self.topk = benchmark, int(k), topk
        if benchmark in REVISITED_BENCHMARKS:
            data = RevisitedDataset(root, distractors=distractors, check_files=False)
            self.protocol, self.ap_protocol = "revisited", "medium"
            self.gnd = data.gnd
            self.positives, self.junk = metrics.revisited_groundtruth(data.gnd, "medium")
            self.query_records, self.database_records = data.queries, data.database
        elif benchmark in REID_BENCHMARKS:
            data = VeRi776(root, check_files=False)
            self.protocol, self.ap_protocol = "reid", None
            self.positives, self.junk = data.groundtruth()
            self.query_records, self.database_records = data.query, data.gallery
        elif benchmark in ACD_BENCHMARKS:  # MSMT17 (camera rule), In-Shop, SOP/CUB (the query itself is junk)
            from asymret.retrieval.datasets import open_dataset

            data = open_dataset(benchmark, root=root, check_files=False)
            self.protocol, self.ap_protocol = "reid", None
            self.positives, self.junk = data.groundtruth()
            self.query_records, self.database_records = data.query, data.gallery
        else:
            raise InputError(f"unknown benchmark {benchmark!r}; choose one of "
                             f"{', '.join(REVISITED_BENCHMARKS + REID_BENCHMARKS + ACD_BENCHMARKS)}")
        self.rows: dict[str, dict] = {}

    def score(self, source: dict) -> dict:
        if self.protocol == "revisited":
            return metrics.evaluate_revisited(self.gnd, protocols=(self.ap_protocol,), per_query=True, **source)
        return metrics.evaluate_reid(self.positives, self.junk, per_query=True, **source)

    def __call__(self, row: str, queries, database) -> None:
        from asymret.index.topk import topk_inner_product
        from asymret.retrieval.evaluate import ranking_source

        q = np.asarray(queries, dtype=np.float32)
        db = np.asarray(database, dtype=np.float32)
        scores, ids = topk_inner_product(q, db, self.k)
        result = self.score(ranking_source(q, db, self.topk))
        entry = result[self.ap_protocol] if self.ap_protocol else result
        self.rows[row] = {"mAP": entry["mAP"], "AP": list(entry["AP"]), "topk": ids.astype(np.int64),
                          "scores": scores.astype(np.float32)}

    def save(self, out_dir, meta: dict | None = None) -> Path:
        """Write ``out_dir/ranks.json`` (+ ``<row>_topk.npy`` / ``<row>_scores.npy`` when large)."""
        if not self.rows:
            raise InputError("no row was evaluated, so there are no rankings to save")
        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        shown = sorted({int(i) for r in self.rows.values() for i in np.unique(r["topk"]) if i >= 0})
        rows = {}
        for name, r in self.rows.items():
            entry = {"mAP": r["mAP"], "AP": [None if a is None or math.isnan(a) else float(a) for a in r["AP"]]}
            if r["topk"].size > INLINE_LIMIT:
                for key in ("topk", "scores"):
                    np.save(out / f"{name}_{key}.npy", r[key])
                    entry[f"{key}_file"] = f"{name}_{key}.npy"
            else:
                entry["topk"] = r["topk"].tolist()
                entry["scores"] = [[round(float(s), 6) for s in line] for line in r["scores"]]
            rows[name] = entry
        doc = {
            "version": FORMAT_VERSION, "benchmark": self.benchmark, "protocol": self.protocol,
            "ap_protocol": self.ap_protocol, "k": self.k, "num_database": len(self.database_records),
            "queries": [{"path": str(r.path), "bbx": list(r.bbx) if r.bbx is not None else None}
                        for r in self.query_records],
            "database": {str(i): str(self.database_records[i].path) for i in shown},
            "groundtruth": [{"positive": np.asarray(p).tolist(), "junk": np.asarray(j).tolist()}
                            for p, j in zip(self.positives, self.junk)],
            "rows": rows, **(meta or {}),
        }
        path = out / RANKS_FILE
        path.write_text(json.dumps(doc))
        return path


def load_ranks(path) -> dict:
    """A saved ``ranks.json`` (or the folder holding it), with ``topk``/``scores`` as numpy arrays."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / RANKS_FILE
    if not path.is_file():
        raise DataError(f"ranks file not found: {path}; write one with 'asymret evaluate ... --save-ranks DIR'")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not JSON ({exc}); write it with 'asymret evaluate ... --save-ranks DIR'") from None
    missing = [k for k in ("queries", "database", "groundtruth", "rows") if k not in doc]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; it was not written by 'asymret evaluate --save-ranks'")
    for name, r in doc["rows"].items():
        for key in ("topk", "scores"):
            if f"{key}_file" in r:
                file = path.parent / r[f"{key}_file"]
                if not file.is_file():
                    raise DataError(f"{path}: row {name} keeps its {key} in {file}, which is missing; "
                                    "copy the whole --save-ranks folder")
                r[key] = np.load(file, allow_pickle=False)
            else:
                r[key] = np.asarray(r[key], dtype=np.float32 if key == "scores" else np.int64)
        r["AP"] = np.array([np.nan if a is None else a for a in r["AP"]], dtype=np.float64)
    doc["database"] = {int(i): p for i, p in doc["database"].items()}
    doc["path"] = str(path)
    return doc


def relevance(doc: dict, query: int, ids) -> list[str]:
    """``"positive"``, ``"junk"`` or ``"negative"`` for each database id in ``query``'s ground truth."""
    gt = doc["groundtruth"][query]
    pos, junk = set(gt["positive"]), set(gt["junk"])
    return ["positive" if i in pos else "junk" if i in junk else "negative" for i in (int(x) for x in ids)]
