"""Frozen-gallery students only on mini-veri (not CI): D3still's baselines without ACD, e.g. the three that
have no ``_acd`` config (vanilla_kd, pkt, ugd) and FitNet on the raw BN-neck features (issue 11).

    python experiments/reid_students_mini.py [--out exp-reid] [--methods fitnet,vanilla_kd,pkt,ugd] [--seeds 0,1,2]

Reuses ``experiments/reid_acd_mini.py``'s gallery run in ``--out`` (trains it first when missing), then one
student per method and seed from ``configs/reid/mini_veri/<method>.yaml`` (resumed, so finished runs in
``--out`` are reused); writes
``docs/results/reid_students_mini.md`` (and ``.json``): asymmetric and query-alone mAP, R1.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reid_acd_mini as acd_mini  # its config loading, overrides and evaluation

DOCS = acd_mini.DOCS
log = logging.getLogger("reid_students_mini")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="exp-reid")
    ap.add_argument("--methods", default="fitnet,vanilla_kd,pkt,ugd")
    ap.add_argument("--seeds", default="0")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    from asymret.mini import ensure_mini
    from asymret.training.trainer import train

    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    mini = ensure_mini(out / "data", size="small")
    started = time.perf_counter()
    gallery_run = out / "runs" / "mini_veri_gallery"
    if not (gallery_run / "pair.pt").is_file():
        train(acd_mini.load("gallery", acd_mini.overrides(out, mini)), progress=False)
    gallery = acd_mini.evaluate(gallery_run / "pair.pt", mini["veri"], ("gallery",))["gallery"]
    results: dict[str, dict[int, dict]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in args.methods.split(","):
            over = acd_mini.overrides(out, mini, seed) + [f"gallery_net.weights={gallery_run / 'query_net.pt'}",
                                                          f"name=s{seed}_{method}"]
            run = train(acd_mini.load(method, over), resume=True, progress=False)  # a finished run is reused
            rows = acd_mini.evaluate(run / "pair.pt", mini["veri"], ("symmetric", "asymmetric"))
            results.setdefault(method, {})[seed] = rows
            log.info("%s seed %d: asym mAP %.2f, query alone %.2f", method, seed,
                         100 * rows["asymmetric"]["mAP"], 100 * rows["symmetric"]["mAP"])
    write_docs(gallery, results, args, time.perf_counter() - started)
    return 0


def write_docs(gallery: dict, results: dict, args, total_s: float) -> None:
    def cell(method, row, key):
        values = [100 * r[row][key] for r in results[method].values()]
        per_seed = ", ".join(f"{v:.2f}" for v in values)
        return per_seed if len(values) == 1 else f"{statistics.mean(values):.2f} ({per_seed})"

    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "reid_students_mini.json").write_text(json.dumps({"gallery": gallery, "results": results}, indent=1))
    lines = ["# Frozen-gallery students on mini-veri", "",
             (f"`python experiments/reid_students_mini.py --methods {args.methods} --seeds {args.seeds}` "
              f"({total_s / 60:.0f} min on the 2-core CPU). Configs: `configs/reid/mini_veri/`; the networks of "
              "`reid_acd_mini.md` (MobileNetV2-1.0 gallery at 64 × 64, query at 32 × 32). Metrics in %; mean "
              "(per seed)."), "",
             f"Gallery network alone: mAP {100 * gallery['mAP']:.2f}, R1 {100 * gallery['R1']:.2f}.", "",
             "| method | asym mAP | asym R1 | query alone mAP |", "|---|---|---|---|"]
    for method in results:
        lines.append(f"| {method} | {cell(method, 'asymmetric', 'mAP')} | {cell(method, 'asymmetric', 'R1')} | "
                     f"{cell(method, 'symmetric', 'mAP')} |")
    (DOCS / "reid_students_mini.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
