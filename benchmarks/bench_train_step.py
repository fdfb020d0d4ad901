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

``--ddp N``: the cached step data parallel on N gloo processes (CPU, one thread each), two ways timed in the
same run on equal copies of the query network: ``all-reduce``, the hand-written per-parameter all-reduce after
backward that the trainer used before (the baseline), and ``DDP``, the trainer's own
:class:`~asymret.training.trainer.StepModule` under torch's DistributedDataParallel (bucketed, overlapped with
the backward pass). Medians of rank 0's step times; the ratio is all-reduce / DDP.

    python benchmarks/bench_train_step.py --ddp 2 [--size 224 --steps 10]
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
    ap.add_argument("--ddp", type=int, default=0, metavar="N", help="time the data-parallel step on N gloo processes")
    args = ap.parse_args()
    if args.ddp:
        return bench_ddp(args)
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


def _ddp_worker(rank: int, world: int, port: int, args, queue) -> None:
    from asymret.training.trainer import StepModule, data_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    query = create_encoder({"backbone": args.query, "input": {"size": args.size}})
    query.train()
    for m in query.modules():  # AML keeps BatchNorm frozen
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    loss_fn = create_loss("contr_plus")
    b, k = args.tuples, args.negatives
    torch.manual_seed(1 + rank)  # each rank its own share of the tuples
    anchors = torch.randn(b, 3, args.size, args.size)
    g = torch.nn.functional.normalize(torch.randn(b * (2 + k), query.dim), dim=1)  # the cached gallery side

    def loss_of(net):
        def step(images):
            q = net(images)
            return loss_fn(LossBatch(query=q, gallery=g[:b], positive=g[b:2 * b, None],
                                     negative=g[2 * b:].reshape(b, k, -1)))
        return step

    hand, wrapped = query, copy.deepcopy(query)
    opt_hand = torch.optim.Adam(hand.parameters(), lr=1e-6)
    opt_ddp = torch.optim.Adam(wrapped.parameters(), lr=1e-6)
    ddp = data_parallel(StepModule(wrapped, loss_fn, loss_of(wrapped)), torch.device("cpu"))
    hand_step = loss_of(hand)

    def all_reduce_step():
        opt_hand.zero_grad(set_to_none=True)
        (hand_step(anchors).total * world).backward()
        for p in hand.parameters():  # the trainer's former _average_gradients
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        opt_hand.step()

    def ddp_step():
        opt_ddp.zero_grad(set_to_none=True)
        total, _ = ddp(anchors)
        (total * world).backward()
        opt_ddp.step()

    variants = {"all-reduce": all_reduce_step, "DDP": ddp_step}
    times = {name: [] for name in variants}
    for _ in range(2):  # warm-up
        for fn in variants.values():
            fn()
    for _ in range(args.steps):  # interleaved, so drift in machine load hits both alike
        for name, fn in variants.items():
            dist.barrier()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    if rank == 0:
        queue.put({name: statistics.median(v) for name, v in times.items()})
    dist.destroy_process_group()


def bench_ddp(args) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(args.ddp, port, args, queue), nprocs=args.ddp, start_method="spawn")
    med = queue.get()
    print(f"{args.ddp} gloo processes (CPU, 1 thread each), query {args.query}, {args.size}px, "
          f"{args.tuples} tuples x (1 + 1 + {args.negatives}) per rank, contr_plus, Adam; medians of {args.steps} steps")
    for name, t in med.items():
        print(f"{name:<12} {1000 * t:9.1f} ms/step")
    print(f"DDP vs hand-written all-reduce: {med['all-reduce'] / med['DDP']:.2f}x faster")


if __name__ == "__main__":
    main()
