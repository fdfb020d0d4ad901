"""One AML training step: cached gallery embeddings vs recomputing the gallery network, vs the query network alone.

A step = 5 tuples (anchor, positive, 5 negatives), contr_plus, Adam. Three variants, timed in one
process on the same tensors:

* ``query only``: the query network's forward + backward + step on the anchors against fixed
  targets (the floor: no gallery side at all);
* ``cached``: what the trainer does: gallery embeddings of every tuple member looked up in the
  embedding cache;
* ``recompute``: the gallery network encodes anchor, positive and negatives at every step (what a
  trainer without the cache would do).

Goal: cached <= 1.15x query only. Medians over ``--steps`` steps after warm-up.

    python benchmarks/bench_train_step.py [--query mobilenetv2_100 --gallery resnet50 --size 224]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from asymret.retrieval.encoders import create_encoder
from asymret.training.losses import LossBatch, create_loss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--query", default="mobilenetv2_100")
    ap.add_argument("--gallery", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--tuples", type=int, default=5)
    ap.add_argument("--negatives", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    gallery = create_encoder({"backbone": args.gallery, "input": {"size": args.size}}).to(device).eval()
    query = create_encoder({"backbone": args.query, "dim": gallery.dim, "input": {"size": args.size}}).to(device)
    query.train()
    for m in query.modules():  # AML keeps BatchNorm frozen
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    loss_fn = create_loss("contr_plus")
    opt = torch.optim.Adam(query.parameters(), lr=1e-6)
    b, k = args.tuples, args.negatives
    images = torch.randn(b * (2 + k), 3, args.size, args.size, device=device)
    anchors = images[:b]
    with torch.no_grad():
        cached = gallery(images)  # the cache: computed once, before training
    targets = cached[:b].clone()

    def step(batch_fn):
        opt.zero_grad(set_to_none=True)
        q = query(anchors)
        loss = batch_fn(q)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def query_only(q):
        return 0.5 * (q - targets).pow(2).sum(1).mean()

    def from_cache(q):
        g = cached
        return loss_fn(LossBatch(query=q, gallery=g[:b], positive=g[b:2 * b, None],
                                 negative=g[2 * b:].reshape(b, k, -1))).total

    def recompute(q):
        with torch.no_grad():
            g = gallery(images)
        return loss_fn(LossBatch(query=q, gallery=g[:b], positive=g[b:2 * b, None],
                                 negative=g[2 * b:].reshape(b, k, -1))).total

    variants = {"query only": query_only, "cached": from_cache, "recompute": recompute}
    times = {name: [] for name in variants}
    for _ in range(2):  # warm-up
        for fn in variants.values():
            step(fn)
    for _ in range(args.steps):  # interleaved, so drift in machine load hits every variant alike
        for name, fn in variants.items():
            t = time.perf_counter()
            step(fn)
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"device {device}, query {args.query} -> gallery {args.gallery} ({gallery.dim}-d), "
          f"{args.size}px, {b} tuples x (1 + 1 + {k}) images")
    for name, t in med.items():
        print(f"{name:<12} {1000 * t:9.1f} ms/step   {t / med['query only']:6.2f}x query only")
    print(f"cached vs recompute: {med['recompute'] / med['cached']:.2f}x faster "
          f"(goal: cached <= 1.15x query only: {'met' if med['cached'] <= 1.15 * med['query only'] else 'NOT met'})")


if __name__ == "__main__":
    main()
