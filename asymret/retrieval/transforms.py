"""Preprocessing built from an encoder's :class:`~asymret.retrieval.specs.InputSpec`: test-time, and
(optionally augmented) training-time.

Two resize conventions, chosen by the type of ``size``:

* int: the longer side becomes ``size``, aspect kept, never enlarged. This is cirtorch's
  ``imresize`` (``PIL.Image.thumbnail``), used by the retrieval benchmarks.
* ``(height, width)``: fixed size, the re-ID convention.

Images resized by the longer side differ in shape, so they cannot be stacked blindly; padding is
no option either (zeros would enter the GeM mean). :func:`asymret.retrieval.encode.encode_tensors`
stacks only images of identical shape and runs the rest as smaller batches.

Training (:func:`build_train_transform`) with :class:`AugmentSpec` enabled always gives one fixed size,
so that a step is one batch and BatchNorm in train mode sees the whole batch, never single images.
"""

from __future__ import annotations

from PIL import Image
from pydantic import Field, model_validator
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from asymret.errors import ConfigError
from asymret.retrieval.specs import InputSpec, Strict


class ResizeLongerSide:
    """Shrink a PIL image so its longer side is ``size`` (cirtorch ``imresize``; no upscaling)."""

    def __init__(self, size: int, interpolation: InterpolationMode = InterpolationMode.BILINEAR):
        self.size = size
        self.interpolation = interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        scale = self.size / max(w, h)
        if scale >= 1:
            return image
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
        return TF.resize(image, [new_h, new_w], interpolation=self.interpolation, antialias=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value})"


def build_transform(spec: InputSpec) -> T.Compose:
    """PIL image -> normalised ``(3, H, W)`` float tensor, as ``spec`` prescribes."""
    interpolation = InterpolationMode(spec.interpolation)
    if isinstance(spec.size, int):
        resize = ResizeLongerSide(spec.size, interpolation)
    else:
        resize = T.Resize(tuple(spec.size), interpolation=interpolation, antialias=True)
    return T.Compose([resize, T.ToTensor(), T.Normalize(spec.mean, spec.std)])


class AugmentSpec(Strict):
    """Training-time augmentation (``data.augment`` of an experiment config); off by default, as AML
    trains without it. When on, every training image is a random resized crop (Szegedy et al., CVPR
    2015: area ``scale`` of the image, aspect ``ratio``) to a fixed size, colour-jittered (brightness,
    contrast, saturation factors 1 ± value; hue shift ± ``hue`` of the colour circle), made grey with
    probability ``grayscale`` and mirrored with probability ``flip`` (torchvision transforms)."""

    enabled: bool = False
    size: tuple[int, int] | None = Field(
        None, description="[height, width] of training images; default: input.size if [h, w], else square")
    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = Field(0.3, ge=0)
    contrast: float = Field(0.3, ge=0)
    saturation: float = Field(0.3, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5, description="fraction of the colour circle; 0.5 = any hue")
    grayscale: float = Field(0.1, ge=0, le=1)
    flip: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _ranges(self):
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"augment.scale must be 0 < low <= high <= 1 (area fractions), got {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"augment.ratio must be 0 < low <= high (width / height), got {list(self.ratio)}")
        if self.size is not None and min(self.size) < 8:
            raise ValueError("augment.size must be at least 8 pixels per side")
        return self


def train_size(spec: InputSpec, augment: AugmentSpec) -> tuple[int, int]:
    """(height, width) of augmented training images: ``augment.size``, else ``spec.size`` when it is
    ``[h, w]``, else a square of the longer-side ``spec.size``."""
    if augment.size is not None:
        return tuple(augment.size)
    return tuple(spec.size) if not isinstance(spec.size, int) else (spec.size, spec.size)


def build_train_transform(spec: InputSpec, augment: AugmentSpec | None = None):
    """PIL image -> normalised ``(3, H, W)`` tensor for training: the test transform
    (:func:`build_transform`) when ``augment`` is off, else the :class:`AugmentSpec` pipeline at a
    fixed size (:func:`train_size`), normalised with ``spec``'s mean and std."""
    if augment is None or not augment.enabled:
        return build_transform(spec)
    a = augment
    steps = [T.RandomResizedCrop(train_size(spec, a), scale=a.scale, ratio=a.ratio,
                                 interpolation=InterpolationMode(spec.interpolation), antialias=True)]
    if a.flip:
        steps.append(T.RandomHorizontalFlip(a.flip))
    if a.brightness or a.contrast or a.saturation or a.hue:
        steps.append(T.ColorJitter(a.brightness, a.contrast, a.saturation, a.hue))
    if a.grayscale:
        steps.append(T.RandomGrayscale(a.grayscale))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def build_reid_train_transform(spec: InputSpec, flip: bool = True, pad: int = 10, erasing: float = 0.5):
    """The re-ID training augmentation (ACD supplementary A.1 (2), fast-reid): resize to the fixed
    ``[H, W]``, random horizontal flip, random crop after zero-padding, z-score, random erasing."""
    if isinstance(spec.size, int):
        raise ConfigError("the re-ID recipe needs fixed-size inputs; set input.size: [height, width] on the networks")
    size = tuple(spec.size)
    ops = [T.Resize(size, interpolation=InterpolationMode(spec.interpolation), antialias=True)]
    ops += [T.RandomHorizontalFlip()] if flip else []
    ops += [T.Pad(pad), T.RandomCrop(size)] if pad else []
    ops += [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    ops += [T.RandomErasing(p=erasing, value=0)] if erasing else []
    return T.Compose(ops)
