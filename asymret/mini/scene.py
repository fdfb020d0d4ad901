"""What the mini benchmarks are drawn from: the photographs inside scikit-image, regions of them, and the
view classes, tones, cameras and geometry that render one image of a region.

Every function takes its numpy Generator from the caller, so a seed gives byte-identical files (JPEGs at one
fixed quality). The builders of :mod:`asymret.mini.benchmark` and :mod:`asymret.mini.acd` lay the renders out in
the real datasets' formats. See ``docs/mini-benchmark.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.data import data_dir as SKIMAGE_DATA
from skimage.filters import gaussian
from skimage.transform import estimate_transform, warp

from asymret.errors import InputError

JPEG_QUALITY = 90

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



def label(kind: str, visible: float) -> str | None:
    """Revisitop's labels from what a render shows: junk under a quarter visible, nothing (a plain
    negative) when the landmark is out of view, otherwise the severity it was rendered with."""
    if visible < NEGATIVE_BELOW:
        return None
    if visible < JUNK_BELOW or kind.startswith("junk"):
        return "junk"
    return kind


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
