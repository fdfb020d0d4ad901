"""Mini versions of ACD's other benchmarks, rendered like mini-veri, in each dataset's official layout.

:func:`build_mini_acd` renders four small datasets from the photographs inside scikit-image (the renderer
of :mod:`asymret.mini.scene`: photo regions as objects, homographies, colour casts, blur, occluders),
deterministically from a seed, so the real readers of :mod:`asymret.retrieval.datasets` open them unchanged:

* ``mini-msmt17/`` as MSMT17_V1 (Wei et al., CVPR 2018): ``train/<pid>/`` and ``test/<pid>/`` images named
  ``PPPP_NNN_CC_<slot>_FFFF_0.jpg``, ``list_{train,val,query,gallery}.txt``. A *person* is a photo region
  seen in tall frames by fixed cameras (each its own viewpoint and tone); test persons are seen by 2-4
  cameras, 2-3 frames each, and one or two frames on different cameras are queries, the rest the gallery.
* ``mini-inshop/`` as In-Shop (Liu et al., CVPR 2016): ``img/<GENDER>/<category>/id_XXXXXXXX/NN_K_<view>.jpg``
  and ``Eval/list_eval_partition.txt``; an *item* is a region, its images views of it; the test items'
  images are split into query and gallery.
* ``mini-sop/`` as Stanford Online Products (Oh Song et al., CVPR 2016): ``<category>_final/<id>_<k>.JPG``,
  ``Ebay_train.txt``, ``Ebay_test.txt``, ``Ebay_info.txt``; a *product* is a region, its category the photo.
* ``mini-cub200/`` as CUB-200-2011 (Wah et al., 2011): ``images/NNN.<name>/<Name>_NNNN_K.jpg``, ``images.txt``,
  ``image_class_labels.txt``, ``classes.txt``, ``train_test_split.txt``; the first half of the classes train.

Within each dataset the training and test objects are different regions. ``asymret data mini-acd OUT`` writes
them; see docs/reid.md.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import asdict, dataclass
from functools import cache
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
    TONES,
    Camera,
    Region,
    grid_regions,
    render_vehicle,
    render_view,
    save_jpeg,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = ".mini-acd-complete"  # written last: its absence means an interrupted build
COMPLETION = Completion(MARKER, "mini-acd.json", FORMAT_VERSION)
MSMT17, INSHOP, SOP, CUB = "mini-msmt17", "mini-inshop", "mini-sop", "mini-cub200"
DATASETS = {MSMT17: "msmt17", INSHOP: "inshop", SOP: "sop", CUB: "cub200"}  # folder -> reader (datasets.DATASETS)
SLOTS = tuple(f"{day}{time}" for day in ("0113", "0114", "0302", "0303") for time in ("morning", "noon", "afternoon"))
VIEWS_INSHOP = ("front", "side", "back", "full", "additional")


@dataclass(frozen=True)
class AcdMiniSize:
    """How much to render: train / test objects per dataset, images per object, cameras (mini-msmt17),
    the long image side (pixels) and the photo cell a region is cut from."""

    msmt17_ids: tuple[int, int]
    cameras: int
    inshop_items: tuple[int, int]
    inshop_views: int
    sop_classes: tuple[int, int]
    sop_views: int
    cub_classes: int
    cub_views: int
    side: int = 64
    cell: int = 80


SIZES = {
    "tiny": AcdMiniSize((4, 3), 3, (4, 3), 3, (4, 3), 3, 6, 3, side=48),  # for tests only; not in the CLI
    "small": AcdMiniSize((40, 20), 6, (40, 20), 5, (40, 20), 4, 40, 6),
    "medium": AcdMiniSize((120, 60), 10, (120, 60), 6, (120, 60), 5, 100, 8, side=96),
}


@cache
def _grid(cell: int) -> tuple[Region, ...]:
    return tuple(grid_regions(PHOTOS, cell))


def _regions(seed: int, stream: int, n: int, cell: int) -> list[Region]:
    """``n`` distinct photo regions in a random order of the (seed, stream) Generator."""
    regions = _grid(cell)
    if len(regions) < n:
        raise InputError(f"only {len(regions)} photo regions for {n} objects; use a smaller size")
    rng = np.random.default_rng([seed, 10, stream])
    return [regions[i] for i in rng.permutation(len(regions))[:n]]


def _view_job(path: Path, region: Region, out_hw: tuple[int, int], number: int, key: tuple) -> tuple:
    return (path, region, ("easy", "hard")[number % 2], out_hw, key)


def render_object_view(job) -> None:
    """Render and save one view of a product/bird/clothing item: a mini-roxford database view (homography,
    occluder, tone) of the region's central part, easy or hard."""
    path, region, kind, out_hw, key = job
    rng = np.random.default_rng(key)
    img, _, _ = render_view(rng, region, kind, out_hw)
    save_jpeg(img, path)


def _lines(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{row}\n" for row in rows))


# --- mini-msmt17 ---------------------------------------------------------------------------------

def person_camera(seed: int, c: int, side: int) -> Camera:
    """A fixed camera filming people: a tall 2:1 frame, a small tilt, its own tone."""
    rng = np.random.default_rng([seed, 11, c])
    w = max(16, side // 2)
    return Camera(rng.uniform(-0.15, 0.15, (4, 2)), rng.uniform(-8, 8), bool(rng.random() < 0.5), (2 * w, w),
                  TONES["camera"].sample(rng))


def build_msmt17(root: Path, seed: int, spec: AcdMiniSize, run) -> dict:
    """Render mini-msmt17 (MSMT17_V1 layout). Person ids restart at 0 in the test split, as in MSMT17;
    about a tenth of the training images go to ``list_val.txt``."""
    rng = np.random.default_rng([seed, 12])
    n_train, n_test = spec.msmt17_ids
    regions = _regions(seed, 1, n_train + n_test, spec.cell)
    cams = [person_camera(seed, c, spec.side) for c in range(spec.cameras)]
    lists: dict[str, list[str]] = {"train": [], "val": [], "query": [], "gallery": []}
    jobs = []
    for k, region in enumerate(regions):
        part, pid = ("train", k) if k < n_train else ("test", k - n_train)
        seen = np.sort(rng.choice(spec.cameras, int(rng.integers(2, min(spec.cameras, 4) + 1)), replace=False))
        slot = SLOTS[int(rng.integers(len(SLOTS)))]
        index, queried = 0, 0
        for c in seen:
            frame = int(rng.integers(0, 9000))
            for f in range(int(rng.integers(2, 4))):
                frame += int(rng.integers(3, 30))
                rel = f"{pid:04d}/{pid:04d}_{index:03d}_{c + 1:02d}_{slot}_{frame:04d}_0.jpg"
                jobs.append((root / part / rel, region, cams[c], (seed, 12, k, int(c), f)))
                if part == "train":
                    lists["val" if rng.random() < 0.1 else "train"].append(f"{rel} {pid}")
                elif f == 0 and queried < 2:  # the first frame on the first one or two cameras
                    lists["query"].append(f"{rel} {pid}")
                    queried += 1
                else:
                    lists["gallery"].append(f"{rel} {pid}")
                index += 1
    run(render_vehicle, jobs)
    for name, rows in lists.items():
        _lines(root / f"list_{name}.txt", rows)
    return {"train_ids": n_train, "test_ids": n_test, "cameras": spec.cameras,
            **{name: len(rows) for name, rows in lists.items()}}


# --- mini-inshop ---------------------------------------------------------------------------------

def build_inshop(root: Path, seed: int, spec: AcdMiniSize, run) -> dict:
    """Render mini-inshop: ``Eval/list_eval_partition.txt`` (count, header, one line per image) and
    ``Img/img/...``; each test item has about half its images as queries, the rest in the gallery."""
    rng = np.random.default_rng([seed, 13])
    n_train, n_test = spec.inshop_items
    regions = _regions(seed, 2, n_train + n_test, spec.cell)
    out_hw = (spec.side, max(16, spec.side * 3 // 4))  # portrait, as shop photos
    rows, jobs = [], []
    for k, region in enumerate(regions):
        item = f"id_{k + 1:08d}"
        gender = ("MEN", "WOMEN")[int(rng.integers(2))]
        category = Path(region.photo).stem.capitalize()
        for v in range(spec.inshop_views):
            rel = f"img/{gender}/{category}/{item}/{v // 2 + 1:02d}_{v % 2 + 1}_{VIEWS_INSHOP[v % 5]}.jpg"
            status = "train" if k < n_train else ("query" if v < max(1, spec.inshop_views // 2) else "gallery")
            rows.append(f"{rel} {item} {status}")
            jobs.append(_view_job(root / "Img" / rel, region, out_hw, v, (seed, 13, k, v)))
    run(render_object_view, jobs)
    _lines(root / "Eval" / "list_eval_partition.txt", [len(rows), "image_name item_id evaluation_status", *rows])
    return {"train_items": n_train, "test_items": n_test,
            **{s: sum(r.endswith(f" {s}") for r in rows) for s in ("train", "query", "gallery")}}


# --- mini-sop ------------------------------------------------------------------------------------

def build_sop(root: Path, seed: int, spec: AcdMiniSize, run) -> dict:
    """Render mini-sop: products in the train split are classes 1..n, in the test split the next ones;
    image ids run on from the train file into the test file; ``Ebay_info.txt`` lists both."""
    n_train, n_test = spec.sop_classes
    regions = _regions(seed, 3, n_train + n_test, spec.cell)
    out_hw = (max(16, spec.side * 3 // 4), spec.side)
    splits: dict[str, list[str]] = {"train": [], "test": []}
    jobs, image_id = [], 0
    for k, region in enumerate(regions):
        super_id = PHOTOS.index(region.photo) + 1
        product = int(hashlib.md5(f"{SOP} {seed} {k}".encode()).hexdigest()[:10], 16) % 10**12
        for v in range(spec.sop_views):
            image_id += 1
            rel = f"{Path(region.photo).stem}_final/{product:012d}_{v}.JPG"
            splits["train" if k < n_train else "test"].append(f"{image_id} {k + 1} {super_id} {rel}")
            jobs.append(_view_job(root / rel, region, out_hw, v, (seed, 14, k, v)))
    run(render_object_view, jobs)
    header = "image_id class_id super_class_id path"
    _lines(root / "Ebay_train.txt", [header, *splits["train"]])
    _lines(root / "Ebay_test.txt", [header, *splits["test"]])
    _lines(root / "Ebay_info.txt", [header, *splits["train"], *splits["test"]])
    return {"train_classes": n_train, "test_classes": n_test, "train": len(splits["train"]),
            "test": len(splits["test"])}


# --- mini-cub200 ---------------------------------------------------------------------------------

def build_cub(root: Path, seed: int, spec: AcdMiniSize, run) -> dict:
    """Render mini-cub200: classes 1..n named after their photo region; the reader trains on the first
    half (as classes 1-100 of CUB-200-2011). ``train_test_split.txt`` (the classification split) alternates."""
    regions = _regions(seed, 4, spec.cub_classes, spec.cell)
    out_hw = (max(16, spec.side * 3 // 4), spec.side)
    images, labels, classes, split, jobs = [], [], [], [], []
    for c, region in enumerate(regions, 1):
        folder = f"{c:03d}.{region.name}"
        classes.append(f"{c} {folder}")
        for v in range(spec.cub_views):
            image_id = len(images) + 1
            rel = f"{folder}/{region.name.capitalize()}_{v + 1:04d}_{c}.jpg"
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {v % 2}")
            jobs.append(_view_job(root / "images" / rel, region, out_hw, v, (seed, 15, c, v)))
    run(render_object_view, jobs)
    for name, rows in (("images.txt", images), ("image_class_labels.txt", labels), ("classes.txt", classes),
                       ("train_test_split.txt", split)):
        _lines(root / name, rows)
    half = spec.cub_classes // 2
    return {"classes": spec.cub_classes, "train_classes": half, "train": half * spec.cub_views,
            "test": (spec.cub_classes - half) * spec.cub_views}


# --- build ---------------------------------------------------------------------------------------

BUILDERS = {MSMT17: build_msmt17, INSHOP: build_inshop, SOP: build_sop, CUB: build_cub}


def build_mini_acd(out_dir, seed: int = 0, size: str = "small", workers: int | None = 1) -> dict:
    """Render the four datasets into ``out_dir`` (replacing earlier ones; other folders there are left alone)
    and return their paths and counts. Writes ``mini-acd.json`` (sizes, seed, versions), then the marker."""
    spec = size_spec(SIZES, size, seed)
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).unlink(missing_ok=True)
        for sub in BUILDERS:
            shutil.rmtree(out / sub, ignore_errors=True)
    except OSError as exc:
        raise DataError(f"cannot write the mini benchmarks to {out} ({exc}); choose a writable folder") from None
    log.info("rendering the %s ACD mini benchmarks (seed %d) into %s", size, seed, out)
    manifest = {"name": "asymret-mini-acd", "format_version": FORMAT_VERSION, "asymret_version": __version__,
                "scikit_image_version": skimage.__version__, "pillow_version": PIL.__version__,
                "numpy_version": np.__version__, "seed": seed, "size": size, "jpeg_quality": JPEG_QUALITY,
                "spec": asdict(spec), "counts": {}}
    with process_pool(workers) as run:
        for sub, build in BUILDERS.items():
            manifest["counts"][sub] = build(out / sub, seed, spec, run)
    return COMPLETION.finish(out, manifest, result)


def ensure_mini_acd(out_dir, seed: int = 0, size: str = "small", workers: int | None = 1) -> dict:
    """:func:`build_mini_acd` unless ``out_dir`` already holds a complete build of this seed, size and format."""
    return COMPLETION.ensure(out_dir, seed, size, lambda out: build_mini_acd(out, seed, size, workers), result)


def result(out: Path, manifest: dict) -> dict:
    """Paths by reader name (``msmt17``, ``inshop``, ``sop``, ``cub200``), seed, size and counts."""
    return {"root": out, **{DATASETS[sub]: out / sub for sub in BUILDERS}, "seed": manifest["seed"],
            "size": manifest["size"], "counts": manifest["counts"]}
