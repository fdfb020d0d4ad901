"""kill -9 of ``asymret index add`` at random moments, each followed by a rerun (issue 14).

Round ``r`` adds the images of batches ``0..r`` (a list file: every earlier image again, plus a new
batch) to a gallery built from batch 0. A child ``asymret index add`` is started, SIGKILLed at a
random moment (a quarter before it logs its encoding plan, the rest after it; or it finishes
first), and then the same command
is rerun to completion. After every rerun the check is:

* every image of batches ``0..r`` is in the gallery exactly once (by path), and no other item;
* the FAISS index's ids equal the SQL ids exactly (no vector without a row, no row without one);
* ids are unique (by construction of the tables) and never reused.

Prints one JSON summary; exits 1 if any check failed. It is a correctness run, not a speed claim
(no timings are compared); the figures are kept in docs/gallery.md.

    python benchmarks/kill_index_add.py                       # 20 kills, SQLite
    python benchmarks/kill_index_add.py --db postgresql+psycopg://postgres@127.0.0.1:5432/test
    python benchmarks/kill_index_add.py --kills 3 --batch 4   # the test's size
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_pair(path: Path) -> Path:
    import torch

    from asymret.retrieval.encoders import create_encoder
    from asymret.retrieval.pair import save_pair

    torch.manual_seed(0)
    query = create_encoder({"backbone": "mobilenetv2_035", "dim": 8, "input": {"size": 32}})
    gallery = create_encoder({"backbone": "resnet10t", "dim": 8, "input": {"size": 32}})
    return save_pair(path, query, gallery)


def make_batches(folder: Path, batches: int, per_batch: int, seed: int = 0) -> list[list[Path]]:
    rng = np.random.default_rng(seed)
    out = []
    for b in range(batches):
        (folder / f"b{b:02d}").mkdir(parents=True)
        paths = []
        for i in range(per_batch):
            path = folder / f"b{b:02d}" / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
            paths.append(path)
        out.append(paths)
    return out


def command(args, root: Path, pair: Path, images: Path, sub: str = "add") -> list[str]:
    cmd = [sys.executable, "-m", "asymret", "index", sub, "--name", args.gallery, "--root", str(root), "--pair", str(pair),
           "--images", str(images), "--workers", "0", "--shard-size", str(args.shard_size)]
    return cmd + (["--db", args.db] if args.db else [])


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(cmd: list[str], kill_after: float | None = None, timeout: float = 600, kill_at: float | None = None) -> dict:
    """Run ``cmd``; with ``kill_after``, SIGKILL it that many seconds after it logged its encoding plan,
    with ``kill_at`` that many seconds after its start (unless it ended first). Returns its outcome
    (``killed`` / ``finished``), status, output, when it logged its plan (``plan_s``) and how long it
    ran after that (``post_plan_s``)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    planned, lines = threading.Event(), []
    moments = {}

    def watch():
        for line in proc.stderr:
            lines.append(line)
            if ("to encode" in line or "resuming" in line) and not planned.is_set():
                moments["plan"] = time.monotonic()
                planned.set()
        planned.set()

    start = time.monotonic()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    outcome = "finished"
    if kill_after is not None or kill_at is not None:
        if kill_at is not None:
            time.sleep(kill_at)
        else:
            planned.wait(timeout)
            time.sleep(kill_after)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            outcome = "killed"
    out = proc.stdout.read()
    status = proc.wait(timeout)
    end = time.monotonic()
    watcher.join(10)
    return {"outcome": outcome, "status": status, "stdout": out, "stderr": "".join(lines),
            "plan_s": moments.get("plan", end) - start, "post_plan_s": end - moments.get("plan", end)}


def phase(outcome: str, rerun_out: str, expected: int) -> str:
    """Where the kill landed, read off what the rerun did: it added images (the kill came before the
    add's commit), resumed a plan that had nothing left (after the commit, before the plan was
    cleared) or found every image stored (after the add was done, before the process ended)."""
    if outcome != "killed":
        return "not killed"
    added = re.search(r"; ([\d,]+) added", rerun_out)
    if added and int(added.group(1).replace(",", "")):
        return "before the commit"
    skipped = re.search(r"skipped ([\d,]+) already", rerun_out)
    if skipped and int(skipped.group(1).replace(",", "")) == expected:
        return "after the add, before exit"
    return "after the commit, before clean-up"


def check(args, root: Path, expected: list[Path]) -> dict:
    from asymret.index import GalleryStore

    with GalleryStore(root, args.db) as store, store.open(args.gallery, readonly=True) as gallery:
        index_ids = gallery.index.ids()
        items = gallery.get(index_ids)
        with store.engine.connect() as conn:
            import sqlalchemy as sa

            from asymret.index.rows import galleries
            from asymret.index.rows import items as table

            gid = conn.execute(sa.select(galleries.c.id).where(galleries.c.name == args.gallery)).scalar_one()
            sql_ids = np.sort(np.asarray(conn.execute(sa.select(table.c.id).where(table.c.gallery_id == gid))
                                         .scalars().all(), np.int64))
    per_path = Counter(item.path for item in items)
    wanted = {str(p.resolve()) for p in expected}
    return {"items": len(items), "faiss_equals_sql": bool(np.array_equal(index_ids, sql_ids)),
            "duplicates": sum(n - 1 for n in per_path.values() if n > 1),
            "missing": len(wanted - set(per_path)), "unexpected": len(set(per_path) - wanted)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kill-and-rerun rounds (default 20)")
    parser.add_argument("--batch", type=int, default=8, help="new images per round (default 8)")
    parser.add_argument("--shard-size", type=int, default=4, help="images per encoding shard (default 4)")
    parser.add_argument("--db", help="SQLAlchemy URL of the metadata (default SQLite in the gallery folder)")
    parser.add_argument("--gallery", default="kill_add", help="the gallery's name (default kill_add; on a shared "
                        "database it is dropped first)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--workdir", help="keep the files here (default: a temporary folder)")
    args = parser.parse_args()
    chooser = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.db:  # a fresh start: drop the gallery a previous run left in this database
            from asymret.index import GalleryStore

            with GalleryStore(work / "galleries", args.db) as store:
                if any(g["name"] == args.gallery for g in store.list()):
                    store.delete(args.gallery)
        pair = make_pair(work / "pair.pt")
        batches = make_batches(work / "images", args.kills + 1, args.batch)
        root = work / "galleries"
        first = work / "round_first.txt"
        first.write_text("\n".join(str(p) for p in batches[0]) + "\n")
        subprocess.run(command(args, root, pair, first, "build"), check=True, env=env(), capture_output=True)
        # Kill moments: a quarter before the plan is logged (start-up, hashing, choosing the images),
        # the rest uniform over how long an add that encodes and adds runs after its plan (measured on
        # the reruns that did add, starting from 0.3 s): encoding, the commit, the clean-up, the exit.
        plan_s, post = 5.0, 0.3
        rounds, failures = [], 0
        for r in range(1, args.kills + 1):
            listing = work / f"round_{r:02d}.txt"
            expected = [p for batch in batches[:r + 1] for p in batch]
            listing.write_text("\n".join(str(p) for p in expected) + "\n")
            if chooser.random() < 0.25:
                delay = -chooser.uniform(0.0, plan_s / 2)
                killed = run(command(args, root, pair, listing), kill_at=plan_s + delay)
            else:
                delay = chooser.uniform(0.0, post)
                killed = run(command(args, root, pair, listing), kill_after=delay)
            rerun = run(command(args, root, pair, listing))
            if rerun["status"] == 0:
                plan_s = rerun["plan_s"]
                if not re.search(r"; 0 added", rerun["stdout"]):
                    post = max(post, rerun["post_plan_s"])
            result = {"round": r, "kill_after_plan_s": round(delay, 3), "outcome": killed["outcome"],
                      "phase": phase(killed["outcome"], rerun["stdout"], len(expected)),
                      "rerun_status": rerun["status"], "rerun": " | ".join(rerun["stdout"].strip().splitlines()),
                      **check(args, root, expected)}
            ok = (rerun["status"] == 0 and result["faiss_equals_sql"] and not result["duplicates"]
                  and not result["missing"] and not result["unexpected"] and result["items"] == len(expected))
            failures += not ok
            result["ok"] = ok
            if not ok:
                result["rerun_stderr"] = rerun["stderr"][-2000:]
            rounds.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
        summary = {"kills": args.kills, "db": "postgresql" if args.db else "sqlite", "images": len(expected),
                   "killed": sum(x["outcome"] == "killed" for x in rounds),
                   "finished_before_kill": sum(x["outcome"] == "finished" for x in rounds),
                   "phases": dict(Counter(x["phase"] for x in rounds)),
                   "rounds_ok": sum(x["ok"] for x in rounds), "failures": failures,
                   "final_items": rounds[-1]["items"] if rounds else None,
                   "kill_window_s": round(post, 2)}
        print(json.dumps(summary))
        if args.db:
            from asymret.index import GalleryStore

            with GalleryStore(root, args.db) as store:
                store.delete(args.gallery)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
