"""The frozen gallery network's side of the re-ID recipe, computed once before training (methods.md §3, §5).

* :func:`gallery_head_outputs`: the raw BN-neck feature of every training image (and, for UGD, its local head
  features), in one pass, kept in the embedding cache; the embedding is its L2 normalisation, the logits its
  classifier's output, so nothing else runs the gallery network again.
* :func:`gallery_uncertainty`: per-image variance of the gallery embedding over a few deterministic views
  (:func:`view_transforms`), for attentive regression.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T

from asymret.errors import ConfigError
from asymret.retrieval.cache import cache_key
from asymret.retrieval.encode import stream_records
from asymret.retrieval.encoders import Encoder, eval_mode
from asymret.training.recipe import RecipeContext


def view_transforms(base, n: int) -> list:
    """``n`` deterministic views of an image for the gallery's uncertainty (attentive regression): the
    image, its mirror, and centre crops of 90 % / 80 % ... (alternately mirrored), each then ``base``."""
    views = [base, T.Compose([T.RandomHorizontalFlip(1.0), base])]
    for i in range(n - 2):
        frac = 0.9 - 0.1 * (i // 2)
        crop = T.Lambda(lambda im, f=frac: T.functional.center_crop(im, [max(1, round(im.height * f)),
                                                                         max(1, round(im.width * f))]))
        views.append(T.Compose([crop] + ([T.RandomHorizontalFlip(1.0)] if i % 2 else []) + [base]))
    return views[:n]


def stack_by_shape(images: list[torch.Tensor]) -> torch.Tensor:
    """One batch tensor from equally sized images (the re-ID recipe's fixed ``[H, W]`` inputs)."""
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) > 1:
        raise ConfigError("the re-ID recipe needs fixed-size inputs; set input.size: [height, width] on the "
                          f"networks (got images of {len(shapes)} shapes)")
    return torch.stack(images)


def gallery_head_outputs(ctx: RecipeContext, g: Encoder, grids: tuple[int, ...],
                         loss_name: str) -> tuple[torch.Tensor, list[np.ndarray]]:
    """``(raw, local)``: the frozen gallery network's raw BN-neck feature of every training image, ``(N, dim)`` on
    the device, and for each of ``grids`` its local head features, an ``(N, cells, dim)`` float16 memmap;
    computed once in one pass and cached (module doc). ``loss_name`` names the loss in the errors."""
    if tuple(g.spec.input.scales) != (1.0,):
        raise ConfigError(f"loss '{loss_name}' reads the gallery network's raw head outputs, which are "
                          "single-scale; set gallery_net.input.scales: [1.0]")
    if g.head is None:
        raise ConfigError(f"loss '{loss_name}' reads the gallery network's re-ID head outputs; set "
                          "head: bnneck on gallery_net")
    names = ["raw", *[f"local{n}" for n in grids]]
    records, dev = ctx.records, ctx.device
    n = len(records)

    def compute(folder: Path) -> dict:
        outputs = {"raw": np.lib.format.open_memmap(folder / "raw.npy", "w+", np.float32, (n, g.dim))}
        for grid in grids:  # float16: 4 bytes a value would take 6 GB for VeRi-776's 37,746 images at P = 8
            outputs[f"local{grid}"] = np.lib.format.open_memmap(folder / f"local{grid}.npy", "w+", np.float16,
                                                                (n, grid * grid, g.dim))

        def heads(images):
            out = g.forward_train(stack_by_shape(images).to(dev, non_blocking=True))
            return {"raw": out.raw, **{f"local{grid}": g.local_features(out.fmap, grid) for grid in grids}}

        with eval_mode(g):
            stream_records(g, records, outputs, heads, batch_size=32, num_workers=ctx.cfg.data.num_workers,
                           device=dev, progress=ctx.progress)
        for array in outputs.values():
            array.flush()
        return {"backbone": g.spec.backbone, "count": n, "dim": g.dim, "arrays": names, "grids": list(grids)}

    key = f"{cache_key(g, records)}-reid-{'-'.join(names)}"
    arrays = ctx.rank0_first(lambda: ctx.cache.get_arrays(key, names, compute))
    raw = torch.from_numpy(np.array(arrays["raw"], dtype=np.float32)).to(dev)
    return raw, [arrays[f"local{grid}"] for grid in grids]


def gallery_uncertainty(ctx: RecipeContext, g: Encoder, n_views: int) -> torch.Tensor:
    """Per-image variance of the gallery embedding over ``n_views`` views (attentive regression, methods.md §5),
    computed once; each view's embeddings are cached like the training embeddings."""
    records, cache = ctx.records, ctx.cache
    views = []
    for v, transform in enumerate(view_transforms(g.transform, n_views)):
        view = copy.copy(g)
        view.transform = transform
        views.append(np.asarray(cache.get(view, records, key=f"{cache_key(g, records)}-view{v}of{n_views}",
                                          batch_size=32, num_workers=ctx.cfg.data.num_workers, device=ctx.device,
                                          progress=ctx.progress)))
    # σ²_i = E_v ‖g_v,i − ḡ_i‖² (the trace of the views' covariance): a sum over dimensions, like the
    # ‖q_i − μ_i‖² it divides, so the loss keeps the scale of a plain regression.
    variance = np.stack(views).var(axis=0).sum(axis=1)
    # Our choice, not the paper's: relative to the training set's mean and floored at a tenth of it, so the
    # loss keeps the scale of a plain regression and no near-certain image weighs more than 10x the average.
    variance = np.maximum(variance / max(float(variance.mean()), 1e-12), 0.1)
    return torch.from_numpy(variance.astype(np.float32)).to(ctx.device)
