"""Sweeps: one base config, a grid of overrides, one training run per grid point, one table of their metrics.

A sweep file (YAML; ``asymret sweep SWEEP.yaml``)::

    base: ../../configs/reid/veri776/r101-256_r18-64/d3still_acd.yaml   # relative to the sweep file
    name: acd_figs_veri776           # default: the file's stem
    output_dir: runs/sweeps          # runs in <output_dir>/<name>/<run>/, the table beside them
    overrides: {train.epochs: 10}    # set in every run (optional)
    grid:                            # a mapping: every combination of its lists;
      - {acd.alpha: [1, 2, 3, 4, 5]} # a list of mappings: the union of theirs
      - {acd.beta: [1, 2, 3, 4]}
    evaluate: {rows: [asymmetric, sir]}    # benchmark, root, distractors, multiscale default to the base's eval
    metrics: [asymmetric.mAP, asymmetric.R1, sir.mAP, sir.R1]

Grid keys are dotted config keys (``loss.0.weight`` indexes a list); values are YAML values. Points that resolve
to the same config (``acd.alpha: 3`` and ``acd.beta: 2`` at the defaults) share one run. Runs go one after the
other; a run whose folder already holds its ``pair.pt`` is not trained again (one with ``checkpoints/last.pt``
resumes), and one whose ``sweep_eval.json`` matches the evaluation asked for is not evaluated again, so an
interrupted sweep continues where it stopped. A folder that holds a run of another config is an error, never
silently reused. The table (``<output_dir>/<name>/<name>.md`` and ``.json``, rewritten after every evaluated run)
has a row per grid point: the swept keys' values and the metrics, fractions printed in percent.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator

from asymret.config import apply_overrides, apply_values, load_tree, validate
from asymret.errors import ConfigError
from asymret.files import atomic_write
from asymret.retrieval.specs import Strict
from asymret.training.config import ExperimentConfig

log = logging.getLogger(__name__)

EVAL_FILE = "sweep_eval.json"
RESERVED = ("name", "output_dir")  # the sweep sets them: every run gets its own folder


class SweepEvaluate(Strict):
    """How every run is evaluated; unset fields come from the base config's ``eval`` section."""

    benchmark: str | None = None
    root: str | None = None
    distractors: str | None = None
    multiscale: bool | None = None
    rows: list[str] | None = Field(None, description="default: symmetric and asymmetric, or asymmetric and sir for "
                                   "a co-trained gallery (ACD)")
    batch_size: int = Field(16, gt=0)


class SweepConfig(Strict):
    base: str = Field(description="the experiment config every run starts from, relative to the sweep file")
    name: str | None = None
    output_dir: str = "runs/sweeps"
    overrides: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list] | list[dict[str, list]]
    evaluate: SweepEvaluate = Field(default_factory=SweepEvaluate)
    metrics: list[str] | None = Field(None, description="dotted paths into the evaluation (asymmetric.mAP, "
                                      "asymmetric.medium.mAP) or into the last metrics.jsonl line (train.loss)")

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid):
        grids = grid if isinstance(grid, list) else [grid]
        if not grids or not all(grids):
            raise ValueError("the grid needs at least one key with a list of values, e.g. {acd.alpha: [1, 2, 3]}")
        for g in grids:
            for key, values in g.items():
                if not values:
                    raise ValueError(f"grid key '{key}' has no values; give a list of at least one")
                if key in RESERVED:
                    raise ValueError(f"'{key}' is set by the sweep (one folder per run); it cannot be swept")
        return grid

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, overrides):
        for key in overrides:
            if key in RESERVED:
                raise ValueError(f"'{key}' is set by the sweep (one folder per run); it cannot be overridden")
        return overrides

    def points(self) -> list[dict[str, Any]]:
        """Every grid point as ``{key: value}``, in file order, each once."""
        out: list[dict] = []
        for g in self.grid if isinstance(self.grid, list) else [self.grid]:
            keys = list(g)
            for combo in itertools.product(*(g[k] for k in keys)):
                point = dict(zip(keys, combo))
                if point not in out:
                    out.append(point)
        return out

    @property
    def keys(self) -> list[str]:
        """The swept keys, in file order."""
        return list(dict.fromkeys(k for p in self.points() for k in p))


@dataclass
class SweepRun:
    """One grid point: its overrides, its resolved config and the run folder (shared by points of one config)."""

    point: dict[str, Any]
    name: str
    cfg: ExperimentConfig
    run_dir: Path
    same_as: str | None = None  # the run this point shares, when its config equals an earlier point's
    status: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


def _value_text(value: Any) -> str:
    """A value as a run name or a table cell shows it; a loss (or a list of them) by its name."""
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return value["name"] + ("-symmetric" if value.get("mode") == "symmetric" else "")
    if isinstance(value, list) and value and all(isinstance(v, dict) and isinstance(v.get("name"), str) for v in value):
        return "+".join(v["name"] for v in value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def run_name(point: dict[str, Any], keys: Sequence[str]) -> str:
    """A folder name from a point: ``alpha=3_beta=2``; a key is shortened to its last part unless that is
    ambiguous among the sweep's keys."""
    last = [k.split(".")[-1] for k in keys]
    parts = []
    for key, value in point.items():
        short = key.split(".")[-1]
        label = short if last.count(short) == 1 else key
        parts.append(f"{label}={_value_text(value)}")
    return re.sub(r"[^A-Za-z0-9._=+,-]+", "-", "_".join(parts))[:120]


def load_sweep(path: str | Path) -> tuple[SweepConfig, Path]:
    """The sweep file, validated, and the path of its base config."""
    path = Path(path).expanduser().resolve()
    tree, origins = load_tree(path)
    sweep = validate(tree, SweepConfig, origins, str(path))
    base = (path.parent / sweep.base).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: base config '{sweep.base}' not found (looked for {base})")
    if sweep.name is None:
        sweep.name = path.stem
    return sweep, base


def plan(path: str | Path, overrides: Sequence[str] = ()) -> tuple[SweepConfig, Path, list[SweepRun]]:
    """Resolve and validate every run of a sweep (nothing is trained): a bad point fails before any run starts.

    ``overrides`` (``key=value``, the command line's) apply to every run after the file's ``overrides``; they may
    not set a swept key.
    """
    sweep, base = load_sweep(path)
    swept = set(sweep.keys)
    clashing = sorted(k.partition("=")[0].strip() for k in overrides if k.partition("=")[0].strip() in swept)
    if clashing:
        raise ConfigError(f"{', '.join(clashing)} is swept by {path}; override other keys only")
    folder = Path(sweep.output_dir) / sweep.name
    tree, origins = load_tree(base)
    tree = apply_values(tree, sweep.overrides, origins, f"{path} (overrides)")
    tree = apply_overrides(tree, overrides, origins)
    runs: list[SweepRun] = []
    seen: dict[str, SweepRun] = {}
    names: set[str] = set()
    for point in sweep.points():
        name = run_name(point, sweep.keys)
        if name in names:  # two points whose values print alike (0.5 and "0.5")
            name = f"{name}_{len(runs)}"
        names.add(name)
        run_origins = dict(origins)
        run_tree = apply_values(tree, point, run_origins, f"{path} (grid point {name})")
        run_tree = apply_values(run_tree, {"name": name, "output_dir": str(folder)}, run_origins, f"{path} (sweep)")
        cfg = validate(run_tree, ExperimentConfig, run_origins, str(base))
        same = seen.get(_identity(cfg))
        if same is not None:
            runs.append(SweepRun(point, name, same.cfg, same.run_dir, same_as=same.name))
            continue
        run = SweepRun(point, name, cfg, folder / name)
        seen[_identity(cfg)] = run
        runs.append(run)
    return sweep, base, runs


def _identity(cfg: ExperimentConfig) -> str:
    """The config without its name: two points that train the same thing."""
    data = cfg.model_dump(mode="json")
    data.pop("name")
    return json.dumps(data, sort_keys=True)


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in dict.fromkeys([*a, *b]) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def eval_settings(sweep: SweepConfig, cfg: ExperimentConfig, co_trained: bool) -> dict:
    """The evaluation of one run: the sweep's ``evaluate`` over the base config's ``eval`` section."""
    e, s = cfg.eval, sweep.evaluate
    benchmark = s.benchmark or e.benchmark
    if benchmark in (None, "none"):
        raise ConfigError(f"run '{cfg.name}' has no benchmark to evaluate on; set eval.benchmark in the base "
                          "config or evaluate.benchmark in the sweep file")
    rows = s.rows or (["asymmetric", "sir"] if co_trained else ["symmetric", "asymmetric"])
    return {"benchmark": benchmark, "root": s.root or e.root, "distractors": s.distractors or e.distractors,
            "multiscale": e.multiscale if s.multiscale is None else s.multiscale, "rows": list(rows)}


def status(run: SweepRun) -> str:
    """``done``, ``evaluate`` (trained, not evaluated), ``resume`` (interrupted), ``train`` (nothing yet), or
    ``shared`` (another point's run). Raises when the folder holds a run of another config."""
    if run.same_as:
        return "shared"
    d = run.run_dir
    saved = d / "config.yaml"
    if saved.is_file():
        differ = _differences(yaml.safe_load(saved.read_text()), run.cfg.model_dump(mode="json"))
        if differ:
            raise ConfigError(f"{d} holds a run of another config (it differs in {', '.join(differ[:5])}); delete "
                              "the folder or give the sweep another output_dir")
    if (d / "pair.pt").is_file():
        return "done" if (d / EVAL_FILE).is_file() else "evaluate"
    return "resume" if (d / "checkpoints" / "last.pt").is_file() else "train"


def default_metrics(benchmark: str, rows: Sequence[str]) -> list[str]:
    from asymret.retrieval.evaluate import REVISITED_BENCHMARKS

    per_row = ("medium.mAP", "hard.mAP") if benchmark in REVISITED_BENCHMARKS else ("mAP", "R1")
    return [f"{row}.{m}" for row in rows for m in per_row] + ["train.loss"]


def lookup(tree: Any, path: str) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"`` (list items by index); ``None`` when absent."""
    for part in path.split("."):
        if isinstance(tree, dict):
            tree = tree.get(part)
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return None
    return tree


def evaluate_run(run: SweepRun, settings: dict, batch_size: int = 16) -> dict:
    """Evaluate a run's pair on the sweep's benchmark; the result is written beside it (``sweep_eval.json``)."""
    from asymret.retrieval.evaluate import evaluate_pair, public
    from asymret.retrieval.pair import load_pair
    from asymret.runtime import resolve_device

    device = resolve_device(run.cfg.train.device, setting="train.device")
    pair = load_pair(run.run_dir / "pair.pt", device=device)
    result = evaluate_pair(pair.query_net, pair.gallery_net, settings["benchmark"], settings["root"],
                           whitenings=pair.whitenings(), distractors=settings["distractors"],
                           multiscale=settings["multiscale"], rows=tuple(settings["rows"]), batch_size=batch_size,
                           num_workers=run.cfg.data.num_workers, device=device,
                           cache_dir=Path(run.cfg.output_dir) / ".cache", reference_gallery=pair.reference_gallery)
    record = {"settings": settings, "results": {row: public(r) for row, r in result.items()}}
    atomic_write(run.run_dir / EVAL_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return record


def _stored_eval(run: SweepRun, settings: dict) -> dict | None:
    path = run.run_dir / EVAL_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("settings") == settings else None


def _train_record(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def run_sweep(path: str | Path, overrides: Sequence[str] = (), dry_run: bool = False,
              progress: bool = True) -> dict:
    """Train and evaluate every run of a sweep not done yet, writing its table after each; returns the table.

    The table is rewritten as each run is evaluated, so an interrupted sweep leaves the rows it finished (the
    others show ``-``). ``dry_run``: resolve every run and report what each still needs; train and write nothing.
    """
    from asymret.training.trainer import Trainer

    sweep, base, runs = plan(path, overrides)
    for run in runs:
        run.status = status(run)
    if dry_run:
        return table(sweep, base, runs, None, dry_run=True)
    metrics = sweep.metrics
    result: dict = {}
    for i, run in enumerate(runs, 1):
        if run.same_as:
            continue
        if run.status in ("train", "resume"):
            log.info("sweep %s: run %d/%d %s (%s)", sweep.name, i, len(runs), run.name, _point_text(run.point))
            Trainer(run.cfg, progress=progress).fit(resume=run.status == "resume")
        settings = eval_settings(sweep, run.cfg, co_trained=not run.cfg.gallery_frozen)
        record = _stored_eval(run, settings) or evaluate_run(run, settings, sweep.evaluate.batch_size)
        metrics = metrics or default_metrics(settings["benchmark"], settings["rows"])
        run.metrics = {"eval": record["results"], "train": _train_record(run.run_dir), "settings": settings}
        result = _write_table(sweep, base, runs, metrics)
    return result


def _write_table(sweep: SweepConfig, base: Path, runs: list[SweepRun], metrics: list[str]) -> dict:
    by_name = {r.name: r for r in runs}
    for run in runs:
        if run.same_as:
            run.metrics = by_name[run.same_as].metrics
    result = table(sweep, base, runs, metrics)
    folder = Path(sweep.output_dir) / sweep.name
    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / f"{sweep.name}.md", folder / f"{sweep.name}.json"
    atomic_write(md, lambda tmp: Path(tmp).write_text(result["markdown"]))
    atomic_write(js, lambda tmp: Path(tmp).write_text(json.dumps({k: v for k, v in result.items()
                                                                    if k != "markdown"}, indent=1)))
    result["files"] = [str(md), str(js)]
    return result


def _point_text(point: dict) -> str:
    return ", ".join(f"{k}={_value_text(v)}" for k, v in point.items())


def _cell(value: Any, percent: bool) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _value_text(value)
    return f"{100 * value:.2f}" if percent else f"{value:.4g}"


def table(sweep: SweepConfig, base: Path, runs: list[SweepRun], metrics: list[str] | None,
          dry_run: bool = False) -> dict:
    """The sweep's table: a row per grid point with the swept keys' resolved values and the metrics."""
    keys = sweep.keys
    rows = []
    for run in runs:
        resolved = run.cfg.model_dump(mode="json")
        row = {"run": run.name, "run_dir": str(run.run_dir), "point": run.point,
               "values": {k: lookup(resolved, k) for k in keys}}
        if run.same_as:
            row["same_as"] = run.same_as
        if dry_run:
            row["status"] = run.status
        else:
            row["metrics"] = {m: lookup(run.metrics.get("train") if m.startswith("train.") else run.metrics.get("eval"),
                                        m.removeprefix("train.")) for m in metrics}
        rows.append(row)
    extra = ["status"] if dry_run else list(metrics)
    head = ["run", *keys, *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        name = row["run"] + (f" (= {row['same_as']})" if row.get("same_as") else "")
        cells = [name, *("-" if row["values"][k] is None else _value_text(row["values"][k]) for k in keys)]
        if dry_run:
            cells.append(row["status"])
        else:
            cells += [_cell(row["metrics"][m], not m.startswith("train.")) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    settings = next((r.metrics["settings"] for r in runs if r.metrics.get("settings")), None)
    title = f"Sweep {sweep.name}: base {base.name}"
    if settings:
        title += f", {settings['benchmark']} ({', '.join(settings['rows'])}); metrics in percent except train.*"
    markdown = f"{title}\n\n" + "\n".join(lines) + "\n"
    return {"sweep": sweep.name, "base": str(base), "keys": keys, "metrics": None if dry_run else metrics,
            "evaluation": settings, "rows": copy.deepcopy(rows), "markdown": markdown}

