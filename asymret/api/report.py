"""Pictures of runs and evaluations (``asymret report``): PNG files, drawn off-screen.

- :func:`plot_training`: a run folder's ``metrics.jsonl`` (one line per epoch) as curves, the loss, each
  of its named parts, the learning rate and the validation score; several runs overlaid.
- :func:`rank_grid`: what torchreid's ``visrank`` shows, from a ``--save-ranks`` folder
  (:mod:`asymret.retrieval.ranks`): for the worst and the best queries by AP, the query and its top-k
  database images framed green (positive), red (negative) or grey (junk, ignored by the protocol), the
  asymmetric row above the gallery-alone row of the same query.
- :func:`plot_cost`: accuracy against the query side's GFLOPs per image over several pairs (each an
  ``asymret evaluate --json`` result, which carries ``cost``), the gallery network alone as the ceiling;
  against latency at batch 1 too when ``asymret profile --json`` results are given.

Curves use matplotlib's object API (``Figure`` on the Agg canvas: no pyplot, no global backend, no
display); the grid is composed with Pillow so every frame sits at a known pixel (:class:`RankGrid`).
matplotlib comes with the ``[report]`` extra and is imported only when a curve is drawn.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from asymret.errors import ConfigError, DataError, InputError

INSTALL_HINT = 'pip install "asymret[report]"'
RELEVANCE_COLOURS = {"positive": (0, 170, 0), "negative": (220, 0, 0), "junk": (150, 150, 150)}
QUERY_COLOUR = (40, 90, 220)
NOT_PLOTTED = {"epoch", "loss", "lr", "time_s", "val"}  # record keys that are not loss parts
ROW_MARKERS = {"asymmetric": "o", "symmetric": "s", "asymmetric_untrained": "X", "sir": "D"}
ANNOTATION_OFFSETS = {"asymmetric": (7, 5), "symmetric": (7, -6), "asymmetric_untrained": (-26, 0), "sir": (7, 9)}


def _figure(**kw):
    """A matplotlib Figure on the Agg canvas, or a ConfigError that says how to install matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(f"asymret report draws its curves with matplotlib, which is not installed; "
                          f"install it with: {INSTALL_HINT}") from None
    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _read_json(path: Path, what: str, how: str):
    if not path.is_file():
        raise DataError(f"{what} not found: {path}; {how}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a JSON file ({exc}); {how}") from None


def _labels(paths: list[Path]) -> list[str]:
    """Short distinct names: the last path part, with its parent where two share it."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


# ----------------------------------------------------------------------------------- training curves


def read_metrics(run) -> list[dict]:
    """The epoch records of a run folder's ``metrics.jsonl`` (or of that file itself)."""
    path = Path(run).expanduser()
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"no metrics.jsonl at {path}; give a run folder that 'asymret train' wrote (runs/<name>)")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno} is not a JSON line ({exc}); remove or fix that line") from None
        if not isinstance(record, dict) or "epoch" not in record:
            raise DataError(f"{path}:{lineno} has no 'epoch'; it is not a line the trainer writes")
        records.append(record)
    if not records:
        raise DataError(f"{path} holds no epoch yet; train at least one epoch first")
    return records


def _val_score(record: dict):
    val = record.get("val")
    return float(val["score"]) if isinstance(val, dict) and isinstance(val.get("score"), (int, float)) else None


def plot_training(runs, out_path) -> Path:
    """Loss, its parts, lr and validation score per epoch of each run (one colour a run) into a PNG."""
    paths = [Path(r).expanduser() for r in runs]
    if not paths:
        raise InputError("give at least one run folder (runs/<name>) to draw training curves")
    histories = [read_metrics(p) for p in paths]
    labels = _labels([p.parent if p.name == "metrics.jsonl" else p for p in paths])
    parts: list[str] = []
    for records in histories:
        for r in records:
            for k, v in r.items():
                if k not in NOT_PLOTTED and k not in parts and isinstance(v, (int, float)) and not isinstance(v, bool):
                    parts.append(k)
    panels = ["loss", *parts, "lr"]
    has_val = any(_val_score(r) is not None for records in histories for r in records)
    if has_val:
        panels.append("val")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(figsize=(4.4 * ncols, 3.3 * nrows), dpi=100, layout="constrained")
    from matplotlib.ticker import MaxNLocator
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    titles = {"loss": "loss (total)", "lr": "learning rate (first parameter group)", "val": "validation (Medium mAP on revisited benchmarks)"}
    val_rows = set()
    for ax, panel in zip(axes, panels):
        for c, (records, label) in enumerate(zip(histories, labels)):
            if panel == "val":
                pts = [(r["epoch"], 100 * _val_score(r)) for r in records if _val_score(r) is not None]
                val_rows.update(r["val"].get("row", "") for r in records if _val_score(r) is not None)
            else:
                pts = [(r["epoch"], float(r[panel])) for r in records
                       if isinstance(r.get(panel), (int, float)) and math.isfinite(float(r[panel]))]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, marker="o", markersize=4, color=f"C{c}", label=label)
        ax.set_title(titles.get(panel, f"loss part: {panel}"), fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if panel == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if panel == "val":
            ax.set_ylabel(f"{'/'.join(sorted(v for v in val_rows if v)) or 'validation'} mAP (%)")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    fig.suptitle("training: " + ", ".join(labels), fontsize=11)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    return out_path


# ---------------------------------------------------------------------------------- ranked-list grids


@dataclass
class RankGrid:
    """A written grid and where each framed thumbnail lies (``box``: x0, y0, x1, y1 of the frame)."""

    path: Path
    cells: list[dict] = field(default_factory=list)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _thumbnail(record_or_path, size: int, bbx=None):
    """The image fitted into a ``size`` square (aspect kept, padded white)."""
    from PIL import Image

    from asymret.retrieval.records import ImageRecord, load_image

    image = load_image(ImageRecord(Path(record_or_path), bbx=tuple(bbx) if bbx else None))
    image.thumbnail((size, size))
    square = Image.new("RGB", (size, size), (255, 255, 255))
    square.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return square


def pick_queries(ap: np.ndarray, n: int) -> list[tuple[str, int]]:
    """``("worst", q)`` for the ``n`` lowest APs, then ``("best", q)`` for the ``n`` highest (no query twice)."""
    valid = np.flatnonzero(~np.isnan(ap))
    order = [int(q) for q in valid[np.argsort(ap[valid], kind="stable")]]
    n_worst = min(n, math.ceil(len(order) / 2))  # fewer than 2n queries: the lower half, then the upper
    n_best = min(n, len(order) - n_worst)
    best = order[len(order) - n_best:][::-1]
    return [("worst", q) for q in order[:n_worst]] + [("best", q) for q in best]


def rank_grid(ranks, out_path, row: str | None = None, beside: str | None = "gallery", queries: int = 3,
              k: int = 10, thumb: int = 96) -> RankGrid:
    """The worst and best ``queries`` of ``row`` by AP (default: asymmetric), each followed by ``beside``.

    ``ranks``: a ``--save-ranks`` folder, its ``ranks.json``, or :func:`asymret.retrieval.ranks.load_ranks`'s
    dict. Each line: the query (blue frame; cropped to its box on revisited benchmarks), then its top ``k``
    database images framed by relevance under the protocol the AP uses.
    """
    from PIL import Image, ImageDraw

    from asymret.retrieval.ranks import load_ranks, relevance

    doc = ranks if isinstance(ranks, dict) else load_ranks(ranks)
    rows = doc["rows"]
    if row is None:
        row = "asymmetric" if "asymmetric" in rows else next(iter(rows))
    if row not in rows:
        raise InputError(f"{doc.get('path', 'the ranks')} has no row {row!r}; it has {', '.join(rows)}")
    lines = [row] + ([beside] if beside in rows and beside != row else [])
    k = max(1, min(k, rows[row]["topk"].shape[1]))
    chosen = pick_queries(rows[row]["AP"], queries)
    if not chosen:
        raise DataError(f"{doc.get('path', 'the ranks')}: no query of row {row} has an AP (no positives)")

    pad, border, label_w, header_h, line_gap = 6, 4, 210, 22, 4
    cell = thumb + 2 * border
    width = label_w + cell + 3 * pad + k * (cell + pad)
    blocks = [("header", kind) for kind in ("worst", "best") if any(c[0] == kind for c in chosen)]
    height = pad + len(blocks) * header_h + len(chosen) * (len(lines) * (cell + line_gap) + pad) + 30
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font, small, bold = _font(13), _font(11), _font(15)
    thumbs: dict = {}

    def framed(key, x, y, colour, loader):
        if key not in thumbs:
            thumbs[key] = loader()
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
        canvas.paste(thumbs[key], (x + border, y + border))
        return (x, y, x + cell - 1, y + cell - 1)

    grid = RankGrid(Path(out_path))
    y = pad
    current = None
    unit = "Medium AP" if doc.get("ap_protocol") == "medium" else "AP"
    for kind, q in chosen:
        if kind != current:
            current = kind
            draw.text((pad, y + 3), f"{kind} queries of the {row} row by {unit} (of {len(doc['queries'])} queries)",
                      fill=(0, 0, 0), font=bold)
            y += header_h
        query = doc["queries"][q]
        for line in lines:
            r = rows[line]
            draw.text((pad, y + 8), f"query {q}", fill=(0, 0, 0), font=font)
            draw.text((pad, y + 26), line, fill=(0, 0, 0), font=font)
            ap = r["AP"][q]
            draw.text((pad, y + 44), f"{unit} {ap:.3f}" if not np.isnan(ap) else f"{unit} n/a", fill=(0, 0, 0),
                      font=font)
            draw.text((pad, y + 62), Path(query["path"]).name[:28], fill=(90, 90, 90), font=small)
            x = label_w
            framed(("q", q), x, y, QUERY_COLOUR, lambda qr=query: _thumbnail(qr["path"], thumb, qr.get("bbx")))
            x += cell + 3 * pad
            ids = r["topk"][q][:k]
            for rank, (i, rel) in enumerate(zip(ids, relevance(doc, q, ids)), 1):
                i = int(i)
                if i < 0:
                    break
                path = doc["database"].get(i)
                if path is None:
                    raise DataError(f"{doc.get('path', 'the ranks')} names no image for database id {i}")
                box = framed(("db", i), x, y, RELEVANCE_COLOURS[rel], lambda p=path: _thumbnail(p, thumb))
                grid.cells.append({"query": q, "row": line, "rank": rank, "id": i, "relevance": rel, "box": box})
                draw.text((x + border + 2, y + border + 1), str(rank), fill=(255, 255, 255), font=small,
                          stroke_width=2, stroke_fill=(0, 0, 0))
                x += cell + pad
            y += cell + line_gap
        y += pad
    x = pad
    for name, colour in (("query", QUERY_COLOUR), *RELEVANCE_COLOURS.items()):
        draw.rectangle([x, y + 4, x + 16, y + 20], fill=colour)
        text = "junk (ignored by the protocol)" if name == "junk" else name
        draw.text((x + 22, y + 5), text, fill=(0, 0, 0), font=font)
        x += 40 + int(draw.textlength(text, font=font))
    grid.path.parent.mkdir(parents=True, exist_ok=True)
    # 256 colours: a third of the bytes; the frames' flat colours keep their exact values
    canvas.quantize(256, method=Image.Quantize.MEDIANCUT).save(grid.path, optimize=True)
    return grid


# ------------------------------------------------------------------------------- accuracy against cost


def read_results(path) -> dict:
    """An evaluation's JSON (``asymret evaluate --json``, ``--save-ranks``'s results.json, ``asymret demo
    --json``): ``{"rows": {row: metrics}, "cost": pair_cost, "name": ...}``."""
    path = Path(path).expanduser()
    how = "give the JSON that 'asymret evaluate --pair ... --json' prints (or --save-ranks' results.json)"
    doc = _read_json(path, "evaluation result", how)
    if not isinstance(doc, dict):
        raise DataError(f"{path} is not a JSON object of rows; {how}")
    rows = {k: v for k, v in doc.items() if isinstance(v, dict) and ("medium" in v or "mAP" in v)}
    if not rows:
        raise DataError(f"{path} has no evaluated rows (gallery, asymmetric, ...); {how}")
    cost = doc.get("cost")
    if not (isinstance(cost, dict) and "query_net" in cost and "gallery_net" in cost):
        if not doc.get("pair"):
            raise DataError(f"{path} has no 'cost' (each side's GFLOPs); evaluate the pair again with "
                            "'asymret evaluate --pair ... --json', which adds it")
        from asymret.retrieval.cost import pair_cost
        from asymret.retrieval.pair import load_pair

        pair = load_pair(doc["pair"], device="cpu")
        cost = pair_cost(pair.query_net, pair.gallery_net)
    name = doc.get("name") or (path.parent.name if path.name == "results.json" else path.stem)
    return {"rows": rows, "cost": cost, "name": str(name), "path": str(path)}


def accuracy_metrics(rows: dict) -> list[tuple[str, callable]]:
    """The (label, getter) pairs plotted: Medium and Hard mAP (revisited) or mAP and R1 (re-ID)."""
    sample = next(iter(rows.values()))
    if "medium" in sample:
        return [("Medium mAP (%)", lambda r: r["medium"]["mAP"]), ("Hard mAP (%)", lambda r: r["hard"]["mAP"])]
    return [("mAP (%)", lambda r: r["mAP"]), ("R1 (%)", lambda r: r["R1"])]


def latency_ms(profile: dict, side: str, batch: int = 1) -> float | None:
    """Median ms of one call at ``batch`` for ``side`` of an ``asymret profile --json`` result (CPU, eager,
    else the first device and runtime that has it); None when the profile does not hold it."""
    by_device = profile.get(side)
    if not isinstance(by_device, dict):
        return None
    devices = (["cpu"] if "cpu" in by_device else []) + [d for d in by_device if d != "cpu"]
    for device in devices:
        runtimes = by_device[device] if isinstance(by_device[device], dict) else {}
        for runtime in (["eager"] if "eager" in runtimes else []) + [r for r in runtimes if r != "eager"]:
            entry = runtimes[runtime].get(str(batch)) if isinstance(runtimes[runtime], dict) else None
            if isinstance(entry, dict) and isinstance(entry.get("median_ms"), (int, float)):
                return float(entry["median_ms"])
    return None


def plot_cost(results, out_path, profiles=None) -> Path:
    """Accuracy of each pair's rows against the GFLOPs (and, with profiles, the latency) of the network
    that encodes the row's queries; the gallery network alone marked at its own cost, as a ceiling line."""
    from asymret.retrieval.evaluate import ROW_QUERY_SIDE, ROW_TITLES

    docs = [read_results(r) for r in results]
    if not docs:
        raise InputError("give at least one evaluation result (--results R.json)")
    kinds = {"medium" in next(iter(d["rows"].values())) for d in docs}
    if len(kinds) > 1:
        raise InputError("the --results mix revisited and re-ID evaluations; draw each kind separately")
    profiles = list(profiles or [])
    if profiles and len(profiles) != len(docs):
        raise InputError(f"give one --profile per --results file, in the same order ({len(docs)} results, "
                         f"{len(profiles)} profiles)")
    profs = [_read_json(Path(p).expanduser(), "profile", "write it with 'asymret profile ... --json'")
             for p in profiles]
    axes_x = [("gflops", "query-side GFLOPs per image (log scale)")]
    if profs:
        axes_x.append(("latency", "query-side latency, batch 1, median ms (log scale)"))
    accuracy = accuracy_metrics(docs[0]["rows"])
    fig = _figure(figsize=(5.6 * len(accuracy), 4.3 * len(axes_x)), dpi=100, layout="constrained")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    axes = fig.subplots(len(axes_x), len(accuracy), squeeze=False)
    for i, (xkind, xlabel) in enumerate(axes_x):
        for j, (ylabel, get) in enumerate(accuracy):
            ax = axes[i, j]
            drawn = 0
            galleries: dict[tuple, list] = {}  # one star per distinct gallery point (pairs often share one)
            for c, d in enumerate(docs):
                prof = profs[c] if profs else None

                def x_of(side, d=d, prof=prof, xkind=xkind):
                    if xkind == "gflops":
                        return d["cost"][side]["gflops"]
                    return latency_ms(prof, side) if prof else None

                for row, r in d["rows"].items():
                    side = ROW_QUERY_SIDE.get(row)
                    x = x_of(side) if side else None
                    if x is None or not x > 0:
                        continue
                    y = 100 * get(r)
                    if row == "gallery":  # the same network (same GFLOPs and accuracy): one star, its mean latency
                        key = (round(d["cost"]["gallery_net"]["gflops"], 6), round(y, 6))
                        galleries.setdefault(key, []).append((c, d["name"], x))
                        continue
                    ax.plot([x], [y], marker=ROW_MARKERS.get(row, "o"), markersize=8, color=f"C{c}",
                            linestyle="none", label=f"{d['name']}: {ROW_TITLES.get(row, row)}")
                    ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", fontsize=8,
                                xytext=ANNOTATION_OFFSETS.get(row, (6, 4)), va="center")
                    drawn += 1
            for (_, y), owners in galleries.items():
                x = float(np.mean([o[2] for o in owners]))
                shared = len(owners) == len(docs) and len(docs) > 1
                colour = "black" if shared else f"C{owners[0][0]}"
                label = "gallery network alone (ceiling)" if shared or len(docs) == 1 else \
                    f"{', '.join(o[1] for o in owners)}: gallery alone (ceiling)"
                ax.axhline(y, color=colour, linestyle="--", linewidth=1, alpha=0.6)
                ax.plot([x], [y], marker="*", markersize=14, color=colour, linestyle="none", label=label)
                ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(8, 6), fontsize=8)
                drawn += 1
            if drawn == 0:
                ax.text(0.5, 0.5, "no latency at batch 1 in the profiles", transform=ax.transAxes,
                        ha="center", va="center")
            else:
                ax.set_xscale("log")
                ax.margins(x=0.15, y=0.12)
                ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(2, len(handles)), fontsize=8)
    fig.suptitle("accuracy against the query side's cost (dashed: the gallery network alone)", fontsize=11)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    return out_path


# ------------------------------------------------------------------------------------------ all of it


def write_report(out_dir, runs=(), ranks=(), results=(), profiles=(), queries: int = 3, k: int = 10) -> list[Path]:
    """Every picture the inputs allow, into ``out_dir``; returns the PNG paths written."""
    if not (runs or ranks or results):
        raise InputError("nothing to draw: give --runs, --ranks and/or --results")
    if profiles and not results:
        raise InputError("--profile needs --results (the accuracy it plots against latency)")
    out = Path(out_dir).expanduser()
    written = []
    if runs:
        written.append(plot_training(runs, out / "training_curves.png"))
    rank_dirs = [Path(r).expanduser() for r in ranks]
    for label, r in zip(_labels([p.parent if p.suffix == ".json" else p for p in rank_dirs]), rank_dirs):
        written.append(rank_grid(r, out / f"ranks_{label.replace('/', '_')}.png", queries=queries, k=k).path)
    if results:
        written.append(plot_cost(results, out / "accuracy_vs_cost.png", profiles=profiles))
    return written
