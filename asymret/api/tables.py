"""The text tables the CLI prints for evaluation results (``asymret evaluate``, ``asymret demo``).

The results themselves are plain dicts from :mod:`asymret.retrieval.evaluate` (their JSON form is
:func:`asymret.retrieval.evaluate.public`); this module only lays them out.
"""

from __future__ import annotations

from asymret.retrieval import metrics
from asymret.retrieval.evaluate import (
    RECALL_BENCHMARKS,
    REVISITED_BENCHMARKS,
    ROW_QUERY_SIDE,
    base_row,
    row_title,
)


def pct(value, width: int) -> str:
    """A fraction as a percentage cell; ``n/a`` for an unknown value (mP@k past a truncated ranking)."""
    return f"{'n/a':>{width}}" if value is None else f"{100 * value:>{width}.2f}"


TRUNCATED_NOTE = ("note: truncated ranking; positives beyond it counted as not retrieved (mAP is a lower bound); "
                  "n/a: an mP@k deeper than some query's retrieved list")


def format_revisited(result: dict, title: str = "") -> str:
    cols = [k for k in result[next(iter(p for p in metrics.REVISITED_PROTOCOLS if p in result))]
            if k.startswith(("mAP", "mP@"))]
    lines = [title] if title else []
    lines.append(f"{'protocol':<10}" + "".join(f"{c:>9}" for c in cols) + f"{'queries':>9}")
    for p in metrics.REVISITED_PROTOCOLS:
        if p in result:
            lines.append(f"{p:<10}" + "".join(pct(result[p][c], 9) for c in cols) + f"{result[p]['queries']:>9d}")
    if not result.get("exact", True):
        lines.append(TRUNCATED_NOTE)
    return "\n".join(lines)


REID_COLUMNS = ("mAP", "mAP_official", "R1", "R5", "R10", "mINP")


def format_reid(result: dict, title: str = "") -> str:
    cols = [c for c in REID_COLUMNS if c in result] + [c for c in result if c.startswith("Recall@")]
    lines = [title] if title else []
    lines.append("".join(f"{c:>13}" for c in cols) + f"{'queries':>9}")
    lines.append("".join(pct(result[c], 13) for c in cols) + f"{result['queries']:>9d}")
    lines.append("mAP: mean of precisions (torchreid/fast-reid); mAP_official: trapezoidal (VeRi MATLAB code)")
    return "\n".join(lines)


def whitening_note(results: dict) -> str | None:
    """One line under a table with ``+Lw`` rows: what they are and where each whitening was learned."""
    used = {}
    for r in results.values():
        w = r.get("whitening")
        if w:
            used.setdefault(w["network"], w)
    if not used:
        return None
    parts = []
    for network, w in used.items():
        where = f" on {w['learned_on']}" if w.get("learned_on") else ""
        amount = f", {w['pairs']} pairs" if w.get("pairs") else f", {w['images']} images" if w.get("images") else ""
        parts.append(f"{network}: {w['kind']} {w['input_dim']} -> {w['dim']}{where}{amount}")
    return ("+ Lw: whitening l2n(P (x - m)) (learned: Radenovic's Lw; pca: PCA whitening); asymmetric rows apply the "
            "gallery network's to both sides, the others their network's own. " + "; ".join(parts))


def format_pair_table(results: dict, benchmark: str, cost: dict | None = None) -> str:
    """One table: a row per test setting, Medium/Hard mAP and mP@10 (revisited) or re-ID metrics.

    ``cost`` (:func:`asymret.retrieval.cost.pair_cost`) adds, beside each row, the parameters and GFLOPs per
    image of the network that encodes that row's queries.
    """
    if benchmark in REVISITED_BENCHMARKS:
        cols = [f"{'M mAP':>8}{'M mP@10':>9}{'H mAP':>8}{'H mP@10':>9}"]

        def cells(r):
            return (f"{pct(r['medium']['mAP'], 8)}{pct(r['medium']['mP@10'], 9)}{pct(r['hard']['mAP'], 8)}"
                    f"{pct(r['hard']['mP@10'], 9)}")
    else:
        names = ("mAP", "mAP_official", "R1", "mINP") + tuple(f"Recall@{k}" for k in RECALL_BENCHMARKS.get(
            benchmark, ()) if k != 1)
        cols = ["".join(f"{c:>13}" for c in names)]

        def cells(r):
            return "".join(pct(r[c], 13) for c in names)
    if cost:
        cols.append(f"{'query-side params':>19}{'GFLOPs':>8}")
    width = max([38, *(len(row_title(row)) + 2 for row in results)])
    lines = [f"{'':<{width}}" + "".join(cols)]
    for row, r in results.items():
        line = f"{row_title(row):<{width}}{cells(r)}"
        if cost and base_row(row) in ROW_QUERY_SIDE:
            c = cost[ROW_QUERY_SIDE[base_row(row)]]
            line += f"{c['params'] / 1e6:>18.2f}M{c['gflops']:>8.3f}"
        lines.append(line)
    if not all(r.get("exact", True) for r in results.values()):
        lines.append(TRUNCATED_NOTE)
    if note := whitening_note(results):
        lines.append(note)
    if cost:
        g = cost["gallery_net"]
        lines.append(f"database side, every row but symmetric: the gallery network, {g['params'] / 1e6:.2f}M params, "
                     f"{g['gflops']:.3f} GFLOPs per image, encoded once offline")
        lines.append("GFLOPs per image at the input size (a square of the longer side), a multiply-add counted as 2 "
                     "(torch.utils.flop_counter)")
    return "\n".join(lines)
