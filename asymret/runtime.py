"""Where and how the code runs: the device, CPU threads, autocast and torch.distributed set-up.

Top level, beside :mod:`asymret.errors` and :mod:`asymret.config`, so that every layer (training, the
encoders, the gallery build, the service) resolves a device, enters autocast and joins a process group in
one way. The settings a user can get wrong (``cuda`` without CUDA) raise the caller's typed error, with the
caller's setting name and fix, so each interface keeps its own sentence.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from asymret.errors import AsymretError, ConfigError


@dataclass(frozen=True)
class Processes:
    """This process's place among torchrun's: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def processes() -> Processes:
    """torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (one process when torchrun did not launch this)."""
    env = os.environ
    return Processes(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))


def resolve_device(name: str = "auto", *, setting: str = "device", fix: str = "use auto or cpu",
                   error: type[AsymretError] = ConfigError, check: bool = True) -> torch.device:
    """The torch device a setting names. ``auto``: the GPU when CUDA is there (under torchrun this rank's,
    ``LOCAL_RANK``), else the CPU. ``cuda`` without CUDA raises ``error`` naming ``setting`` and ``fix``
    (``check=False``: left to torch, for callers that never checked)."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", processes().local_rank) if "LOCAL_RANK" in os.environ else torch.device("cuda")
    device = torch.device(name)
    if check and device.type == "cuda" and not torch.cuda.is_available():
        raise error(f"{setting} is {name!r} but CUDA is not available; {fix}")
    return device


def module_device(module: torch.nn.Module, device=None) -> torch.device:
    """``device``, with ``module`` moved there; ``None`` keeps the module's own device."""
    if device is None:
        return next(module.parameters()).device
    device = torch.device(device)
    module.to(device)
    return device


def amp_enabled(device: torch.device, amp: bool = True) -> bool:
    """Mixed precision runs on GPU only (bf16); on CPU it is slower and changes results, so it is off there."""
    return bool(amp) and device.type == "cuda"


def autocast(device: torch.device, amp: bool = True):
    """bf16 autocast on GPU when ``amp``; a no-op context elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_enabled(device, amp))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op CPU threads (process-wide) when ``threads`` is given; returns the previous count,
    for callers that give it back."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    return before


def init_distributed(device: torch.device, timeout: timedelta | None = None,
                     backend: str | None = None) -> tuple[torch.device, bool]:
    """Join torchrun's process group when this is one of several processes: ``(device, joined)``. A GPU device
    becomes this rank's (``LOCAL_RANK``); the backend is nccl on GPU, gloo on CPU unless ``backend`` says.
    ``joined`` is False when there is one process or the group already exists (then the caller does not own it)."""
    procs = processes()
    if procs.world == 1 or dist.is_initialized():
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend, **({"timeout": timeout} if timeout is not None else {}))
    return device, True


@contextmanager
def distributed(timeout: timedelta | None = None) -> Iterator[tuple[int, int]]:
    """``(rank, world)``: torchrun's when it launched this process (a gloo group, for barriers, left when the
    block ends if this call created it), else ``(0, 1)``."""
    if processes().world == 1:
        yield 0, 1
        return
    _, own = init_distributed(torch.device("cpu"), timeout=timeout, backend="gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        if own:
            dist.destroy_process_group()


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def broadcast(obj, world: int):
    """Rank 0's ``obj`` on every rank (any picklable object; ranks on other machines cannot read rank 0's files)."""
    if world == 1:
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
