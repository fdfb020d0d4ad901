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

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path

import numpy as np
import PIL
import skimage
from PIL import Image
from skimage.data import data_dir as SKIMAGE_DATA
from skimage.filters import gaussian
from skimage.transform import estimate_transform, warp

from asymret import __version__
from asymret.errors import DataError, InputError
from asymret.retrieval.datasets import cid2filename

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
JPEG_QUALITY = 90
MARKER = ".mini-complete"  # written last: its absence means an interrupted build
ROXFORD, VERI, SFM, DISTRACTORS = "mini-roxford", "mini-veri", "mini-sfm", "revisitop1m"

# Photographs bundled in the scikit-image wheel (none needs pooch). Left out: motorcycle_right (the
# same scene as motorcycle_left, so it would hold unlabelled positives), and the synthetic or nearly
# flat images (chessboards, phantom, cell, clock_motion, horse, microaneurysms).
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "coins.png", "camera.png", "moon.png",
          "page.png", "text.png", "color.png", "logo.png")
# Textures never hold a landmark or vehicle: they feed distractors and occluders.
TEXTURES = ("brick.png", "grass.png", "gravel.png")

CORE_FRACTION = 0.55  # a landmark is the centre of its region; the rest is its context
JUNK_BELOW = 0.25     # revisitop: less than a quarter of the object visible is junk
NEGATIVE_BELOW = 0.02  # a view showing (almost) none of the landmark is a plain negative

def hue_rotation(degrees: float) -> np.ndarray:
    """3x3 RGB matrix rotating colours by ``degrees`` about the grey axis u = (1, 1, 1)/sqrt(3), i.e. a
    hue rotation that keeps grey grey (Rodrigues: R = cos t I + sin t [u]x + (1 - cos t) u u^T)."""
    t = np.deg2rad(degrees)
    u = np.full(3, 1 / np.sqrt(3))
    cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.cos(t) * np.eye(3) + np.sin(t) * cross + (1 - np.cos(t)) * np.outer(u, u)


@dataclass(frozen=True)
class ToneRange:
    """Ranges of a photometric change: a colour remap (hue rotation up to ±``hue`` degrees, with
    probability ``permute`` a random swap of the colour channels, with probability ``grey`` a
    black-and-white photo), a colour-temperature shift (red against blue gain, ± ``temperature``),
    per-channel gain 1 ± ``gain`` (colour cast), saturation, contrast, gamma (exposure), Gaussian blur
    sigma (defocus, pixels), noise sigma (sensor). The remap makes a landmark's colours unreliable, as
    day, night, season and film do to real ones, so colour statistics alone stop identifying it."""

    gain: float
    saturation: tuple[float, float]
    contrast: tuple[float, float]
    gamma: tuple[float, float]
    blur: tuple[float, float]
    noise: tuple[float, float]
    hue: float = 0.0
    permute: float = 0.0
    grey: float = 0.0
    temperature: float = 0.0

    def sample(self, rng) -> Tone:
        mix = hue_rotation(rng.uniform(-self.hue, self.hue)) if self.hue else np.eye(3)
        if self.permute and rng.random() < self.permute:
            mix = np.eye(3)[rng.permutation(3)] @ mix
        if self.grey and rng.random() < self.grey:
            mix = np.full((3, 3), 1 / 3) @ mix
        t = rng.uniform(-self.temperature, self.temperature) if self.temperature else 0.0
        gains = (1 + rng.uniform(-self.gain, self.gain, 3)) * np.array([1 + t, 1.0, 1 - t])
        return Tone(gains, rng.uniform(*self.saturation), rng.uniform(*self.contrast), rng.uniform(*self.gamma),
                    rng.uniform(*self.blur), rng.uniform(*self.noise), mix)


@dataclass(frozen=True)
class Tone:
    """One concrete photometric change (drawn from a :class:`ToneRange`); ``mix``: 3x3 colour remap."""

    gains: np.ndarray
    saturation: float
    contrast: float
    gamma: float
    blur: float
    noise: float
    mix: np.ndarray = field(default_factory=lambda: np.eye(3))

    def apply(self, rng, img: np.ndarray) -> np.ndarray:
        img = np.clip(img @ self.mix.T.astype(np.float32), 0, 1) * self.gains.astype(np.float32)
        grey = img.mean(axis=-1, keepdims=True)
        img = grey + self.saturation * (img - grey)
        img = img.mean() + self.contrast * (img - img.mean())
        img = np.clip(img, 0, 1) ** np.float32(self.gamma)
        if self.blur > 0.3:
            img = gaussian(img, sigma=self.blur, channel_axis=-1, preserve_range=True)
        return np.clip(img + np.float32(self.noise) * rng.standard_normal(img.shape, dtype=np.float32), 0, 1)


@dataclass(frozen=True)
class ViewClass:
    """How one class of landmark views is drawn. ``zoom``: view side / landmark side; ``shift``: view
    centre offset, in landmark sides; ``rot``: max rotation (degrees); ``persp``: max corner jitter
    (fraction of the view side); ``occluded``: chance of an occluder covering an ``occlusion``
    fraction of the landmark's box; ``tone``: photometric range (a key of :data:`TONES`)."""

    zoom: tuple[float, float]
    shift: tuple[float, float]
    rot: float
    persp: float
    occluded: float
    occlusion: tuple[float, float]
    tone: str


TONES = {
    # queries: the landmark as its photographer saw it, in its own colours
    "query": ToneRange(0.1, saturation=(0.75, 1.25), contrast=(0.85, 1.15), gamma=(0.75, 1.3), blur=(0.0, 0.8),
                       noise=(0.0, 0.015)),
    # database views: other light, other season, other film: hues turn, channels swap, colour vanishes,
    # while the remap keeps every pixel's intensity (only gain, contrast and gamma change that)
    "mild": ToneRange(0.1, saturation=(0.75, 1.25), contrast=(0.85, 1.15), gamma=(0.75, 1.3), blur=(0.0, 0.8),
                      noise=(0.0, 0.015), hue=90, permute=0.25, grey=0.15, temperature=0.2),
    "medium": ToneRange(0.2, saturation=(0.5, 1.4), contrast=(0.7, 1.25), gamma=(0.65, 1.5), blur=(0.0, 1.5),
                        noise=(0.0, 0.03), hue=180, permute=0.4, grey=0.2, temperature=0.3),
    "severe": ToneRange(0.35, saturation=(0.1, 1.7), contrast=(0.5, 1.4), gamma=(0.45, 2.2), blur=(0.5, 2.2),
                        noise=(0.01, 0.05), hue=180, permute=0.5, grey=0.3, temperature=0.4),
    # traffic cameras: strong casts, night-like desaturation, defocus, but vehicles stay recognisable
    "camera": ToneRange(0.3, saturation=(0.2, 1.4), contrast=(0.6, 1.3), gamma=(0.55, 1.8), blur=(0.0, 1.4),
                        noise=(0.0, 0.04)),
}
VIEWS = {
    # a query shows the whole region, the landmark inside its context, nearly frontal
    "query": ViewClass((1.55, 1.8), (0.0, 0.05), 3, 0.02, occluded=0.0, occlusion=(0.0, 0.0), tone="query"),
    "easy": ViewClass((1.15, 1.8), (0.0, 0.08), 8, 0.06, occluded=0.3, occlusion=(0.02, 0.1), tone="mild"),
    "hard": ViewClass((0.8, 1.8), (0.0, 0.25), 35, 0.2, occluded=0.7, occlusion=(0.1, 0.4), tone="severe"),
    # junk: a glimpse of the landmark's edge, or the landmark behind a large occluder
    "junk_edge": ViewClass((0.6, 0.9), (0.5, 0.65), 20, 0.1, occluded=0.0, occlusion=(0.0, 0.0), tone="medium"),
    "junk_occluded": ViewClass((1.1, 1.6), (0.0, 0.1), 10, 0.08, occluded=1.0, occlusion=(0.8, 0.95),
                               tone="medium"),
}


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


@dataclass(frozen=True)
class Region:
    """A rectangle ``box = (x0, y0, x1, y1)`` of one photograph: a landmark, vehicle or distractor.
    Views are rendered from its pixels alone, in its own coordinates (origin at its top-left)."""

    photo: str
    box: tuple[int, int, int, int]
    name: str

    def pixels(self) -> np.ndarray:
        x0, y0, x1, y1 = self.box
        return photo(self.photo)[y0:y1, x0:x1]

    def frame(self) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = self.box
        return (0, 0, x1 - x0, y1 - y0)

    def core(self) -> np.ndarray:
        """The landmark proper: the central ``CORE_FRACTION`` of the region, as (x0, y0, x1, y1)."""
        _, _, w, h = self.frame()
        mx, my = (1 - CORE_FRACTION) / 2 * w, (1 - CORE_FRACTION) / 2 * h
        return np.array([mx, my, w - mx, h - my])


# --- photographs and regions ---------------------------------------------------------------------

@cache
def photo(name: str) -> np.ndarray:
    """A bundled scikit-image photograph as float32 RGB in [0, 1] (grey replicated, alpha on white)."""
    with Image.open(Path(SKIMAGE_DATA) / name) as im:
        if im.mode == "RGBA":
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255


def grid_regions(names, cell: int) -> list[Region]:
    """Tile each photo into a grid of cells of at least ``cell`` pixels, keeping cells with content
    (luminance spread): flat sky or black borders would make landmarks nobody could find."""
    regions = []
    for name in names:
        grey = photo(name).mean(axis=-1)
        h, w = grey.shape
        ys = np.linspace(0, h, max(1, h // cell) + 1).astype(int)
        xs = np.linspace(0, w, max(1, w // cell) + 1).astype(int)
        for i in range(len(ys) - 1):
            for j in range(len(xs) - 1):
                if grey[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].std() >= 0.06:
                    box = (int(xs[j]), int(ys[i]), int(xs[j + 1]), int(ys[i + 1]))
                    regions.append(Region(name, box, f"{Path(name).stem}_r{i}c{j}"))
    return regions


def spread(rng: np.random.Generator, regions: list[Region], n: int) -> list[Region]:
    """``n`` regions drawn round-robin over the photos (in random order), so landmarks span photos."""
    by_photo: dict[str, list[Region]] = {}
    for r in regions:
        by_photo.setdefault(r.photo, []).append(r)
    pools = [[p[i] for i in rng.permutation(len(p))] for p in by_photo.values()]
    pools = [pools[i] for i in rng.permutation(len(pools))]
    picked = []
    while len(picked) < n and any(pools):
        picked += [pool.pop() for pool in pools if pool][: n - len(picked)]
    if len(picked) < n:
        raise InputError(f"only {len(picked)} photo regions available for {n} landmarks; use a smaller size")
    return picked


# --- geometry ------------------------------------------------------------------------------------

def view_quad(rng, core: np.ndarray, aspect: float, zoom, shift, rot: float, persp: float) -> np.ndarray:
    """The photo quadrilateral (4 x/y corners, clockwise from top-left) a camera sees: a rectangle of
    the output's ``aspect`` around the landmark ``core``, zoomed, shifted, rotated and with its
    corners jittered, i.e. a random homography as in synthetic-homography training (DeTone 2018)."""
    size = core[2:] - core[:2]
    angle = rng.uniform(0, 2 * np.pi)
    centre = (core[:2] + core[2:]) / 2 + rng.uniform(*shift) * size * [np.cos(angle), np.sin(angle)]
    side = np.sqrt(size.prod()) * rng.uniform(*zoom)
    half = side / 2 * np.array([np.sqrt(aspect), 1 / np.sqrt(aspect)])
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
    corners = corners + rng.uniform(-persp, persp, (4, 2)) * 2 * half
    theta = np.deg2rad(rng.uniform(-rot, rot))
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return centre + corners @ rotation.T


def fit_inside(quad: np.ndarray, box) -> np.ndarray:
    """Move the quad's centre into ``box`` and shrink the quad about it until it lies inside, so a view
    never shows another region (which could hold another landmark or vehicle)."""
    lo, hi = np.array(box[:2], float) + 1, np.array(box[2:], float) - 1
    centre = np.clip(quad.mean(axis=0), lo, hi)
    d = quad - quad.mean(axis=0)
    with np.errstate(divide="ignore"):
        room = np.where(d > 0, hi - centre, centre - lo) / np.abs(d)
    return centre + min(1.0, room.min()) * d


def render(img: np.ndarray, quad: np.ndarray, out_hw: tuple[int, int]):
    """Warp the photo so ``quad`` fills an ``out_hw`` frame; returns the image and the homography
    (output pixel -> photo pixel; ``tform.inverse`` maps photo points into the frame)."""
    h, w = out_hw
    frame = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], float)
    tform = estimate_transform("projective", frame, quad)
    return warp(img, tform, output_shape=out_hw, order=1, mode="edge").astype(np.float32), tform


def box_in_frame(tform, core: np.ndarray, out_hw) -> np.ndarray:
    """The axis-aligned box (x1, y1, x2, y2) of the warped landmark, clipped to the frame."""
    x0, y0, x1, y1 = core
    pts = tform.inverse(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
    h, w = out_hw
    return np.clip(np.r_[pts.min(axis=0), pts.max(axis=0)], 0, [w - 1, h - 1, w - 1, h - 1])


def visible_fraction(tform, core: np.ndarray, out_hw, occluder) -> float:
    """Fraction of a 16x16 grid of landmark points that land inside the frame and not under the
    occluder: the measured visibility that decides easy/hard versus junk."""
    g = (np.arange(16) + 0.5) / 16
    xs, ys = np.meshgrid(core[0] + g * (core[2] - core[0]), core[1] + g * (core[3] - core[1]))
    p = tform.inverse(np.c_[xs.ravel(), ys.ravel()])
    h, w = out_hw
    seen = (p[:, 0] >= 0) & (p[:, 0] <= w - 1) & (p[:, 1] >= 0) & (p[:, 1] <= h - 1)
    if occluder is not None:
        ox0, oy0, ox1, oy1 = occluder
        seen &= ~((p[:, 0] >= ox0) & (p[:, 0] < ox1) & (p[:, 1] >= oy0) & (p[:, 1] < oy1))
    return float(seen.mean())


# --- photometry and occlusion --------------------------------------------------------------------

def occlude(rng, img: np.ndarray, box: np.ndarray, fraction: float):
    """Paste a tinted texture patch (a passer-by, a tree, a car) over about ``fraction`` of ``box``;
    returns the image and the occluder's rectangle (None when nothing was pasted)."""
    h, w = img.shape[:2]
    bw, bh = box[2] - box[0], box[3] - box[1]
    stretch = rng.uniform(0.7, 1.4)
    ow = int(np.clip(round(bw * np.sqrt(fraction * stretch)), 0, w))
    oh = int(np.clip(round(bh * np.sqrt(fraction / stretch)), 0, h))
    if fraction <= 0 or ow < 2 or oh < 2:
        return img, None
    x0 = int(np.clip(round(rng.uniform(box[0], max(box[0], box[2] - ow))), 0, w - ow))
    y0 = int(np.clip(round(rng.uniform(box[1], max(box[1], box[3] - oh))), 0, h - oh))
    texture = photo(TEXTURES[rng.integers(len(TEXTURES))])
    ty, tx = rng.integers(0, texture.shape[0] - oh + 1), rng.integers(0, texture.shape[1] - ow + 1)
    img = img.copy()
    img[y0:y0 + oh, x0:x0 + ow] = texture[ty:ty + oh, tx:tx + ow] * rng.uniform(0.4, 1.2, 3)
    return np.clip(img, 0, 1), (x0, y0, x0 + ow, y0 + oh)


def save_jpeg(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255 + 0.5).astype(np.uint8)).save(path, format="JPEG", quality=JPEG_QUALITY)


# --- mini-roxford --------------------------------------------------------------------------------

def render_view(rng, region: Region, kind: str, out_hw) -> tuple[np.ndarray, np.ndarray, float]:
    """One photograph of ``region`` under view class ``kind`` (:data:`VIEWS`): returns the image, the
    landmark's box in it and the fraction of the landmark visible."""
    view = VIEWS[kind]
    core = region.core()
    quad = fit_inside(view_quad(rng, core, out_hw[1] / out_hw[0], view.zoom, view.shift, view.rot, view.persp),
                      region.frame())
    img, tform = render(region.pixels(), quad, out_hw)
    box = box_in_frame(tform, core, out_hw)
    fraction = rng.uniform(*view.occlusion) if rng.random() < view.occluded else 0.0
    img, occluder = occlude(rng, img, box, fraction)
    img = TONES[view.tone].sample(rng).apply(rng, img)
    return img, box, visible_fraction(tform, core, out_hw, occluder)


def frame_shape(rng, side: int) -> tuple[int, int]:
    """(height, width) of a database photo: landscape 4:3 mostly, portrait sometimes."""
    short = round(side * 3 / 4)
    return (short, side) if rng.random() < 0.7 else (side, short)


def query_shape(region: Region, side: int) -> tuple[int, int]:
    """(height, width) of a query photo: 4:3 in the orientation of the landmark's region."""
    _, _, w, h = region.frame()
    short = round(side * 3 / 4)
    return (short, side) if w >= h else (side, short)


def render_photo(job) -> tuple[list[float], float]:
    """Render and save one mini-roxford image; returns the landmark's box in it and its visibility."""
    path, region, kind, side, key = job
    rng = np.random.default_rng(key)
    out_hw = query_shape(region, side) if kind == "query" else frame_shape(rng, side)
    img, box, visible = render_view(rng, region, kind, out_hw)
    save_jpeg(img, path)
    return [round(float(v), 1) for v in box], visible


def label(kind: str, visible: float) -> str | None:
    """Revisitop's labels from what a render shows: junk under a quarter visible, nothing (a plain
    negative) when the landmark is out of view, otherwise the severity it was rendered with."""
    if visible < NEGATIVE_BELOW:
        return None
    if visible < JUNK_BELOW or kind.startswith("junk"):
        return "junk"
    return kind


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


# --- mini-veri -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Camera:
    """A fixed camera: viewpoint (corner offsets, tilt, driving direction), frame size, colour cast,
    exposure and blur, the same for every vehicle it films."""

    corners: np.ndarray
    rot: float
    flip: bool
    out_hw: tuple[int, int]
    tone: Tone

    @classmethod
    def sample(cls, rng) -> Camera:
        side, aspect = rng.integers(64, 97), rng.uniform(0.75, 1.4)
        return cls(rng.uniform(-0.2, 0.2, (4, 2)), rng.uniform(-15, 15), bool(rng.random() < 0.4),
                   (round(side / np.sqrt(aspect)), round(side * np.sqrt(aspect))), TONES["camera"].sample(rng))


def render_vehicle(job) -> None:
    """Render and save one sighting: the camera's fixed view of the vehicle's region, jittered a
    little per frame (the vehicle moves), sometimes partly occluded, then the camera's tone with a
    small exposure change."""
    path, region, cam, key = job
    rng = np.random.default_rng(key)
    size = np.array(region.frame()[2:], float)
    corners = np.array([[0, 0], [1, 0], [1, 1], [0, 1]]) - 0.5 + cam.corners
    if cam.flip:
        corners = corners[[1, 0, 3, 2]]
    theta = np.deg2rad(cam.rot)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    centre = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
    quad = centre + (corners * size * rng.uniform(0.92, 1.08)) @ rotation.T
    scale = rng.uniform(0.9, 1.1)
    img, _ = render(region.pixels(), fit_inside(quad, region.frame()),
                    (round(cam.out_hw[0] * scale), round(cam.out_hw[1] * scale)))
    if rng.random() < 0.25:  # a pole, a sign or another vehicle in front
        img, _ = occlude(rng, img, np.array([0, 0, img.shape[1], img.shape[0]]), rng.uniform(0.05, 0.25))
    tone = replace(cam.tone, gains=cam.tone.gains * rng.uniform(0.92, 1.08))
    save_jpeg(tone.apply(rng, img), path)


def veri_gt(test: list[str], queries: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Official VeRi ground truth, 1-based into ``test``: gt = same vehicle on another camera,
    jk = same vehicle on the same camera (the query itself included)."""
    parsed = [(n[:4], n[5:9]) for n in test]
    gt, jk = [], []
    for q in queries:
        vid, cam = q[:4], q[5:9]
        gt.append([i + 1 for i, (v, c) in enumerate(parsed) if v == vid and c != cam])
        jk.append([i + 1 for i, (v, c) in enumerate(parsed) if v == vid and c == cam])
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


# --- build ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def process_pool(workers: int | None):
    """Yields ``run(fn, jobs)`` = ``[fn(job) for job in jobs]``, spread over ``workers`` processes
    (None: all cores, at most 8). Every image has its own Generator, so the files are the same for
    any number of workers."""
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if workers <= 1:
        yield lambda fn, jobs: [fn(job) for job in jobs]
        return
    # spawn, not fork: the caller may hold BLAS or torch threads, which a forked child can deadlock on
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda fn, jobs: list(pool.map(fn, jobs, chunksize=max(1, len(jobs) // (4 * workers))))


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
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (out / "README.txt").write_text(readme(manifest))
    (out / MARKER).write_text(json.dumps({"seed": seed, "size": size, "format_version": FORMAT_VERSION}))
    return result(out, manifest)


def size_spec(sizes: dict, size: str, seed: int):
    """``sizes[size]`` for a render of ``seed``, or the one-sentence error saying what to pass."""
    if size not in sizes:
        raise InputError(f"unknown mini benchmark size '{size}'; choose one of: {', '.join(sizes)}")
    if seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed}")
    return sizes[size]


def ensure_built(out: Path, marker: str, manifest_name: str, want: dict, build, finish) -> dict:
    """``finish(out, manifest)`` when ``out`` holds a complete build whose ``marker`` file records ``want`` (seed,
    size, format version) beside its ``manifest_name``; otherwise ``build()``, which renders it again."""
    try:
        done = json.loads((out / marker).read_text())
        manifest = json.loads((out / manifest_name).read_text())
    except (OSError, ValueError):
        return build()
    return finish(out, manifest) if done == want else build()


def ensure_mini(out_dir, seed: int = 0, size: str = "small", workers: int | None = 1) -> dict:
    """:func:`build_mini` unless ``out_dir`` already holds a complete build of this seed, size and format."""
    out = Path(out_dir).expanduser()
    return ensure_built(out, MARKER, "manifest.json", {"seed": seed, "size": size, "format_version": FORMAT_VERSION},
                        lambda: build_mini(out, seed, size, workers), result)


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
