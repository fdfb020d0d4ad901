"""Test-time preprocessing built from an encoder's :class:`~asymret.retrieval.specs.InputSpec`.

Two resize conventions, chosen by the type of ``size``:

* int: the longer side becomes ``size``, aspect kept, never enlarged. This is cirtorch's
  ``imresize`` (``PIL.Image.thumbnail``), used by the retrieval benchmarks.
* ``(height, width)``: fixed size, the re-ID convention.

Images resized by the longer side differ in shape, so they cannot be stacked blindly; padding is
no option either (zeros would enter the GeM mean). :func:`asymret.retrieval.encode.encode_tensors`
stacks only images of identical shape and runs the rest as smaller batches.
"""

from __future__ import annotations

from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from asymret.retrieval.specs import InputSpec


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
