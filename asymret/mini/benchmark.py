"""The bundled mini benchmark: landmarks and vehicles rendered from the photographs inside scikit-image.

No real dataset can be downloaded at run time, so :func:`build_mini` renders three small ones,
deterministically from a seed, in the **exact on-disk formats** of the real benchmarks, so the real
readers (:mod:`asymret.retrieval.datasets`) open them unchanged:

* ``mini-roxford/`` as revisited Oxford (Radenović et al., CVPR 2018): ``jpg/<name>.jpg``,
  ``gnd_mini-roxford.pkl`` and a revisitop1m-style distractor list. A *landmark* is a region of a
  photograph; its database views are rendered under homographies, scale, rotation, crops,
  colour/exposure shifts, blur, noise and occlusion, and labelled by what they show of it:
  *easy* (mild change), *hard* (severe change), *junk* (under a quarter of it visible).
* ``mini-sfm/`` as retrieval-SfM-120k (Radenović et al., TPAMI 2018), the training set: regions
  disjoint from the landmarks, each a cluster of views, with query/positive pairs.
* ``mini-veri/`` as VeRi-776 (Liu et al., ICME 2016): ``image_{train,query,test}/``, ``name_*.txt``,
  ``gt_index.txt``, ``jk_index.txt``. A *vehicle* is a smaller photo region, a *camera* a fixed
  viewpoint, colour cast, blur and scale.

Every random draw comes from a numpy Generator seeded by ``(seed, stream[, item])``, and JPEGs are
written at one fixed quality, so a seed gives byte-identical files. See ``docs/mini-benchmark.md``.
"""


from __future__ import annotations

import hashlib
import logging
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL
import skimage

from asymret import __version__
from asymret.errors import DataError, InputError
from asymret.mini.build import Completion, process_pool, size_spec
from asymret.mini.scene import (
    JPEG_QUALITY,
    PHOTOS,
    TEXTURES,
    Camera,
    Region,
    frame_shape,
    grid_regions,
    label,
    query_shape,
    render_vehicle,
    render_view,
    save_jpeg,
    spread,
)
from asymret.retrieval.datasets import cid2filename

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MARKER = ".mini-complete"  # written last: its absence means an interrupted build
COMPLETION = Completion(MARKER, "manifest.json", FORMAT_VERSION)
ROXFORD, VERI, SFM, DISTRACTORS = "mini-roxford", "mini-veri", "mini-sfm", "revisitop1m"


@dataclass(frozen=True)
class MiniSize:
    """How much to render. ``views``: easy, hard and junk renders per landmark (labels are then
    set by what each render shows); ``*_side``: long image side in pixels; ``sfm_clusters``: train
    and val clusters of mini-sfm, ``sfm_views`` images each."""

    landmarks: int
    queries_per_landmark: int
    views: tuple[int, int, int]
    db_background: int
    distractors: int
    db_side: int
    query_side: int
    veri_train_ids: int
    veri_test_ids: int
    cameras: int
    sfm_clusters: tuple[int, int]
    sfm_views: int
    landmark_cell: int = 170
    vehicle_cell: int = 80


SIZES = {
    "tiny": MiniSize(3, 1, (2, 2, 1), 4, 6, 96, 128, 4, 3, 3, (4, 1), 4),  # for tests only; not in the CLI
    "small": MiniSize(12, 2, (5, 5, 3), 60, 300, 256, 320, 60, 30, 8, (40, 6), 10),
    "medium": MiniSize(24, 3, (8, 8, 4), 200, 2000, 256, 320, 200, 100, 12, (40, 6), 16),
}


# --- mini-roxford --------------------------------------------------------------------------------

def render_photo(job) -> tuple[list[float], float]:
    """Render and save one mini-roxford image; returns the landmark's box in it and its visibility."""
    path, region, kind, side, key = job
    rng = np.random.default_rng(key)
    out_hw = query_shape(region, side) if kind == "query" else frame_shape(rng, side)
    img, box, visible = render_view(rng, region, kind, out_hw)
    save_jpeg(img, path)
    return [round(float(v), 1) for v in box], visible


def split_regions(seed: int, spec: MiniSize) -> tuple[list[Region], list[Region], list[Region]]:
    """Disjoint photo regions: mini-roxford landmarks, mini-sfm training clusters (so training never
    sees a test landmark), and the rest (plus the textures) for background photos and distractors."""
    rng = np.random.default_rng([seed, 0])
    regions = grid_regions(PHOTOS, spec.landmark_cell)
    landmarks = spread(rng, regions, spec.landmarks)
    rest = [regions[i] for i in rng.permutation(len(regions)) if regions[i] not in landmarks]
    n_sfm = sum(spec.sfm_clusters)
    if len(rest) < 2 * n_sfm:
        raise InputError(f"only {len(rest)} photo regions left for {n_sfm} training clusters; use a smaller size")
    return landmarks, rest[:n_sfm], rest[n_sfm:] + grid_regions(TEXTURES, spec.landmark_cell)


def build_roxford(root: Path, seed: int, spec: MiniSize, landmarks: list[Region], others: list[Region],
                  run) -> dict:
    """Render mini-roxford: queries, labelled landmark views, background photos and R1M-style
    distractors (``others``: non-landmark regions, neighbours of landmarks among them, sharing their
    textures and colours; half heavily altered). ``run(fn, jobs)`` maps a job list, maybe over processes."""
    rng = np.random.default_rng([seed, 4])
    jpg, d_jpg = root / "jpg", root / DISTRACTORS / "jpg"
    # Each image has its own Generator keyed (seed, 0, image number): the same files in any process.
    photos: list[tuple[str, int | None, str, Region]] = []  # (name, landmark, view class, region)
    for li, lm in enumerate(landmarks):
        kinds = ["query"] * spec.queries_per_landmark + ["easy"] * spec.views[0] + ["hard"] * spec.views[1]
        kinds += [("junk_edge", "junk_occluded")[k % 2] for k in range(spec.views[2])]
        photos += [(f"{lm.name}_{number:06d}", li, kind, lm)
                   for kind, number in zip(kinds, rng.permutation(len(kinds)))]
    photos += [(f"mini_{i:06d}", None, ("easy", "hard")[i % 2], others[j])
               for i, j in enumerate(rng.integers(len(others), size=spec.db_background))]
    jobs = [(jpg / f"{name}.jpg", region, kind, spec.query_side if kind == "query" else spec.db_side, (seed, 0, i))
            for i, (name, _, kind, region) in enumerate(photos)]
    distractors = [f"{i // 1000:03d}/{i:07d}.jpg" for i in range(spec.distractors)]
    jobs += [(d_jpg / name, others[j], ("easy", "hard")[i % 2], spec.db_side, (seed, 2, i))
             for i, (name, j) in enumerate(zip(distractors, rng.integers(len(others), size=len(distractors))))]
    rendered = run(render_photo, jobs)

    queries = [(name, li, box) for (name, li, kind, _), (box, _) in zip(photos, rendered) if kind == "query"]
    db = [(name, li, label(kind, visible) if li is not None else None)
          for (name, li, kind, _), (_, visible) in zip(photos, rendered) if kind != "query"]
    db = [db[i] for i in rng.permutation(len(db))]  # index order must say nothing about labels
    gnd = [{"bbx": box, **{k: [i for i, (_, lm, lab) in enumerate(db) if lm == li and lab == k]
                           for k in ("easy", "hard", "junk")}} for _, li, box in queries]
    if any(not (g["easy"] or g["hard"]) for g in gnd):
        raise RuntimeError("a mini-roxford query has no positive; the view ranges in VIEWS are broken")
    with open(root / f"gnd_{ROXFORD}.pkl", "wb") as f:  # protocol 3 and key order as the official files
        pickle.dump({"gnd": gnd, "imlist": [n for n, _, _ in db], "qimlist": [n for n, _, _ in queries]},
                    f, protocol=3)
    (root / DISTRACTORS / f"{DISTRACTORS}.txt").write_text("".join(f"{n}\n" for n in distractors))
    return {"landmarks": len(landmarks), "queries": len(queries), "database": len(db),
            "distractors": len(distractors), **{k: sum(len(g[k]) for g in gnd) for k in ("easy", "hard", "junk")}}


# --- mini-sfm ------------------------------------------------------------------------------------

def build_sfm(root: Path, seed: int, spec: MiniSize, clusters: list[Region], run) -> dict:
    """Render mini-sfm, a training set in the layout of retrieval-SfM-120k (cirtorch, Radenović et al.
    TPAMI 2018): a cluster ("3-D model") is a landmark-free region seen in ``spec.sfm_views`` easy and
    hard views; images at ``ims/`` + :func:`cid2filename`; ``mini-sfm.pkl`` holds ``train`` and
    ``val`` splits, each with ``cids``, ``cluster`` and the query/positive pairs ``qidxs``/``pidxs``
    (every other image of a cluster is a query, its positive another image of the cluster)."""
    rng = np.random.default_rng([seed, 3])
    n_train = spec.sfm_clusters[0]
    db, jobs = {}, []
    for split, regions, first in (("train", clusters[:n_train], 0), ("val", clusters[n_train:], n_train)):
        cids, cluster, qidxs, pidxs = [], [], [], []
        for c, region in enumerate(regions, start=first):
            members = range(len(cids), len(cids) + spec.sfm_views)
            for i in members:
                cids.append(hashlib.md5(f"{SFM} {seed} {split} {i}".encode()).hexdigest())
                cluster.append(c)
                jobs.append((cid2filename(cids[-1], root / "ims"), region, ("easy", "hard")[i % 2], spec.db_side,
                             (seed, 3, len(jobs))))
            for q in members[::2]:
                qidxs.append(q)
                pidxs.append(int(rng.choice([p for p in members if p != q])))
        db[split] = {"cids": cids, "cluster": cluster, "qidxs": qidxs, "pidxs": pidxs}
    run(render_photo, jobs)
    with open(root / f"{SFM}.pkl", "wb") as f:
        pickle.dump(db, f, protocol=3)
    return {split: {"clusters": len(set(d["cluster"])), "images": len(d["cids"]), "pairs": len(d["qidxs"])}
            for split, d in db.items()}


def veri_gt(test: list[str], queries: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Official VeRi ground truth, 1-based into ``test``: gt = same vehicle on another camera,
    jk = same vehicle on the same camera (the query itself included); names ``VVVV_cCCC_...``."""
    by_vehicle: dict[str, list[tuple[int, str]]] = {}
    for j, name in enumerate(test):
        by_vehicle.setdefault(name[:4], []).append((j + 1, name[5:9]))
    gt, jk = [], []
    for q in queries:
        same = by_vehicle.get(q[:4], [])
        gt.append([j for j, cam in same if cam != q[5:9]])
        jk.append([j for j, cam in same if cam == q[5:9]])
    return gt, jk


def build_veri(root: Path, seed: int, spec: MiniSize, run) -> dict:
    """Render mini-veri: train and test vehicles (disjoint identities) each seen by 2-5 of
    ``spec.cameras`` cameras in short tracks; one query per test vehicle and camera, also listed in
    the test set (same file) as in VeRi."""
    rng = np.random.default_rng([seed, 1])
    regions = grid_regions(PHOTOS, spec.vehicle_cell)
    n_ids = spec.veri_train_ids + spec.veri_test_ids
    if len(regions) < n_ids:
        raise InputError(f"only {len(regions)} photo regions for {n_ids} vehicles; use a smaller size")
    picked = [regions[i] for i in rng.permutation(len(regions))[:n_ids]]
    vids = rng.permutation(np.arange(1, n_ids + 1))
    cams = [Camera.sample(np.random.default_rng([seed, 1, 0, c])) for c in range(spec.cameras)]
    names: dict[str, list[str]] = {"train": [], "test": [], "query": []}
    jobs = []
    for k, (region, vid) in enumerate(zip(picked, vids)):
        part = "train" if k < spec.veri_train_ids else "test"
        for c in np.sort(rng.choice(spec.cameras, rng.integers(2, min(spec.cameras, 5) + 1), replace=False)):
            frame = int(rng.integers(0, 9_000_000)) * 10
            for f in range(int(rng.integers(1, 4))):
                frame += int(rng.integers(5, 40))
                name = f"{vid:04d}_c{c + 1:03d}_{frame:08d}_1.jpg"
                jobs.append((root / f"image_{part}" / name, region, cams[c], (seed, 1, 1, int(vid), int(c), f)))
                names[part].append(name)
                if part == "test" and f == 0:
                    names["query"].append(name)
    run(render_vehicle, jobs)
    (root / "image_query").mkdir(parents=True, exist_ok=True)
    for name in names["query"]:
        shutil.copyfile(root / "image_test" / name, root / "image_query" / name)
    for part, listed in names.items():
        listed.sort()
        (root / f"name_{part}.txt").write_text("".join(f"{n}\n" for n in listed))
    gt, jk = veri_gt(names["test"], names["query"])
    for fname, rows in (("gt_index.txt", gt), ("jk_index.txt", jk)):  # official: trailing space, CRLF
        (root / fname).write_bytes("".join("".join(f"{i} " for i in row) + "\r\n" for row in rows).encode())
    return {"train_ids": spec.veri_train_ids, "test_ids": spec.veri_test_ids, "cameras": spec.cameras,
            **{part: len(listed) for part, listed in names.items()}}


def build_mini(out_dir, seed: int = 0, size: str = "small", workers: int | None = 1) -> dict:
    """Render both datasets into ``out_dir`` (replacing earlier ones) and return paths and counts.

    Writes ``manifest.json`` and ``README.txt`` (sizes, seed, version), then the completion marker last.
    ``workers``: rendering processes, None for all cores (see :func:`process_pool`; more than one
    needs the calling script's ``if __name__ == "__main__"`` guard); the files are the same for any number.
    """
    spec = size_spec(SIZES, size, seed)
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).unlink(missing_ok=True)
        for sub in (ROXFORD, SFM, VERI):
            shutil.rmtree(out / sub, ignore_errors=True)
    except OSError as exc:
        raise DataError(f"cannot write the mini benchmark to {out} ({exc}); choose a writable folder") from None
    log.info("rendering the %s mini benchmark (seed %d) into %s", size, seed, out)
    manifest = {
        "name": "asymret-mini", "format_version": FORMAT_VERSION, "asymret_version": __version__,
        "scikit_image_version": skimage.__version__, "pillow_version": PIL.__version__,
        "numpy_version": np.__version__, "seed": seed, "size": size,
        "jpeg_quality": JPEG_QUALITY, "spec": asdict(spec), "photos": list(PHOTOS), "textures": list(TEXTURES),
        "paths": {"roxford": ROXFORD, "gnd": f"{ROXFORD}/gnd_{ROXFORD}.pkl",
                  "distractors": f"{ROXFORD}/{DISTRACTORS}/{DISTRACTORS}.txt", "veri": VERI,
                  "train_pkl": f"{SFM}/{SFM}.pkl", "train_images": f"{SFM}/ims"},
    }
    landmarks, clusters, others = split_regions(seed, spec)
    manifest["regions"] = {"landmarks": [r.name for r in landmarks], "sfm": [r.name for r in clusters]}
    with process_pool(workers) as run:
        manifest["roxford"] = build_roxford(out / ROXFORD, seed, spec, landmarks, others, run)
        manifest["sfm"] = build_sfm(out / SFM, seed, spec, clusters, run)
        manifest["veri"] = build_veri(out / VERI, seed, spec, run)
    (out / "README.txt").write_text(readme(manifest))
    return COMPLETION.finish(out, manifest, result)


def ensure_mini(out_dir, seed: int = 0, size: str = "small", workers: int | None = 1) -> dict:
    """:func:`build_mini` unless ``out_dir`` already holds a complete build of this seed, size and format."""
    return COMPLETION.ensure(out_dir, seed, size, lambda out: build_mini(out, seed, size, workers), result)


def result(out: Path, manifest: dict) -> dict:
    """What build/ensure return: paths under ``out``, seed, size and the manifest's counts."""
    paths = {key: out / rel for key, rel in manifest["paths"].items()}
    return {"root": out, **paths, "seed": manifest["seed"], "size": manifest["size"],
            "roxford_counts": manifest["roxford"], "sfm_counts": manifest["sfm"], "veri_counts": manifest["veri"]}


def readme(manifest: dict) -> str:
    rox, sfm, veri = manifest["roxford"], manifest["sfm"], manifest["veri"]
    return (
        f"asymret mini benchmark (format {manifest['format_version']}, asymret {manifest['asymret_version']}, "
        f"scikit-image {manifest['scikit_image_version']})\n"
        f"size: {manifest['size']}   seed: {manifest['seed']}   JPEG quality: {manifest['jpeg_quality']}\n\n"
        "Rendered from the photographs bundled with scikit-image; same seed, same files.\n\n"
        f"{ROXFORD}/  revisited-Oxford layout: jpg/, gnd_{ROXFORD}.pkl, {DISTRACTORS}/{DISTRACTORS}.txt\n"
        f"  {rox['landmarks']} landmarks, {rox['queries']} queries, {rox['database']} database images, "
        f"{rox['distractors']} distractors\n"
        f"  positives over all queries: easy {rox['easy']}, hard {rox['hard']}; junk {rox['junk']}\n"
        f"{SFM}/  retrieval-SfM-120k layout (training): ims/, {SFM}.pkl; train {sfm['train']['clusters']} "
        f"clusters ({sfm['train']['images']} images), val {sfm['val']['clusters']} ({sfm['val']['images']})\n"
        f"{VERI}/  VeRi-776 layout: image_{{train,query,test}}/, name_*.txt, gt_index.txt, jk_index.txt\n"
        f"  {veri['train_ids']} train vehicles ({veri['train']} images), {veri['test_ids']} test vehicles "
        f"({veri['test']} images, {veri['query']} queries), {veri['cameras']} cameras\n\n"
        "See docs/mini-benchmark.md in the asymret repository.\n"
    )
