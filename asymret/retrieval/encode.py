"""Batched, streamed, optionally sharded encoding of images into embeddings.

Images stream through a DataLoader whose workers open them (:func:`load_image`, the only place
images are opened) and apply the encoder's own transform; the main process runs the encoder under
``torch.inference_mode`` with bf16 autocast on CUDA. Images resized by their longer side differ in
shape: each loader batch is split into groups of identical shape, each group one stacked forward
pass, so nothing is padded (padding would enter the GeM mean) and rows keep record order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from asymret.errors import AsymretError, InputError
from asymret.retrieval.encoders import Encoder
from asymret.retrieval.records import ImageRecord, load_image
from asymret.runtime import autocast, module_device


class RecordImages(Dataset):
    """``records[i]`` opened and preprocessed by ``transform``.

    A user error (missing or broken image) is returned, not raised: raised inside a worker it would
    reach the user wrapped in the worker's traceback instead of its one sentence.
    """

    def __init__(self, records: Sequence[ImageRecord], transform):
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Tensor | AsymretError:
        try:
            return self.transform(load_image(self.records[i]))
        except AsymretError as exc:
            return exc


def shard_bounds(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that shard ``shard`` of ``num_shards`` encodes.

    Shards are contiguous and as equal as possible, so concatenating the shards' outputs in shard
    order gives the rows in record order.
    """
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise InputError(f"shard must be in [0, num_shards), got shard={shard}, num_shards={num_shards}")
    return n * shard // num_shards, n * (shard + 1) // num_shards


def shape_groups(images: Sequence) -> list[list[int]]:
    """Indices of ``images`` grouped by shape (first-seen order): each group stacks into one batch."""
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    return list(groups.values())


def encode_tensors(encoder: Encoder, images: Sequence[Tensor], device: torch.device) -> Tensor:
    """Embeddings ``(len(images), dim)`` of preprocessed images that may differ in shape.

    Images of one shape form one batch through :meth:`Encoder.encode_batch`; rows keep input order.
    """
    out = torch.empty(len(images), encoder.dim, device=device, dtype=torch.float32)
    for rows in shape_groups(images):
        batch = torch.stack([images[i].to(device, non_blocking=True) for i in rows])
        out[rows] = encoder.encode_batch(batch).float()
    return out


@contextmanager
def inference(device: torch.device, amp: bool = False):
    """Inference mode; fp32 unless ``amp``, which autocasts to bf16 on CUDA (never on CPU).

    fp32 is the default because lowering precision changes the embeddings and hence the metrics (EDM,
    seed 003 §7.4, warns against doing it unmeasured); docs/metrics.md gives the measured difference.
    """
    with torch.inference_mode(), autocast(device, amp):
        yield


def encode_images(
    encoder: Encoder, images: Sequence[Image.Image], device=None, amp: bool = False
) -> np.ndarray:
    """Embeddings ``(N, dim)`` float32 of PIL images already in memory (e.g. uploaded queries)."""
    device = module_device(encoder, device)
    with inference(device, amp):
        return encode_tensors(encoder, [encoder.transform(image) for image in images], device).cpu().numpy()


def encode_records(
    encoder: Encoder,
    records: Sequence[ImageRecord],
    batch_size: int = 32,
    num_workers: int | None = None,
    device=None,
    amp: bool = False,
    progress: bool = True,
    shard: int = 0,
    num_shards: int = 1,
) -> np.ndarray:
    """Embeddings ``(M, encoder.dim)`` float32 of ``records``, rows in record order.

    ``device``: where to run (the encoder is moved there); ``None`` keeps the encoder's device.
    ``amp``: bf16 autocast on CUDA when True (default fp32), never on CPU.
    Multi-scale extraction follows ``encoder.spec.input.scales``.
    ``shard``/``num_shards``: encode only the contiguous slice :func:`shard_bounds` gives
    (``M`` rows), e.g. one per rank for a sharded gallery encoding.
    """
    start, stop = shard_bounds(len(records), shard, num_shards)
    records = records[start:stop]
    device = module_device(encoder, device)
    out = np.empty((len(records), encoder.dim), dtype=np.float32)
    stream_records(encoder, records, {"embeddings": out},
                   lambda images: {"embeddings": encode_tensors(encoder, images, device)},
                   batch_size=batch_size, num_workers=num_workers, device=device, amp=amp, progress=progress)
    return out


def stream_records(
    encoder: Encoder,
    records: Sequence[ImageRecord],
    outputs: dict[str, np.ndarray],
    compute: Callable[[list[Tensor]], dict[str, Tensor]],
    batch_size: int = 32,
    num_workers: int | None = None,
    device=None,
    amp: bool | None = None,
    progress: bool = True,
) -> None:
    """Stream ``records`` (opened by workers, ``encoder.transform``-ed) through ``compute`` in inference mode:
    ``compute(images)`` gets one loader batch (a list of tensors) and returns named ``(b, ...)`` tensors, whose
    rows are written, in record order, into the preallocated arrays ``outputs[name]`` (e.g. memmaps).

    :func:`encode_records` is this with the encoder's embedding; the re-ID recipe also keeps the raw and local
    head features of its frozen gallery network (:mod:`asymret.training.reid`).
    """
    if num_workers is None:  # up to 4 image-opening processes, never more than the cores
        num_workers = min(4, os.cpu_count() or 1)
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    device = module_device(encoder, device)
    loader = DataLoader(
        RecordImages(records, encoder.transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
        pin_memory=device.type == "cuda",
    )
    row = 0
    bar = tqdm(
        total=len(records), unit="img", desc=f"encoding ({encoder.spec.backbone})", disable=not progress
    )
    with bar, inference(device, amp):
        for batch in loader:
            for item in batch:
                if isinstance(item, AsymretError):
                    raise item
            for name, values in compute(batch).items():
                out = outputs[name]
                out[row : row + len(batch)] = values.to(torch.float32).cpu().numpy().astype(out.dtype, copy=False)
            row += len(batch)
            bar.update(len(batch))
