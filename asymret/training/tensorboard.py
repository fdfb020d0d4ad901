"""TensorBoard scalars of a run, beside its ``metrics.jsonl``: ``runs/<name>/tb/``.

The trainer hands every epoch's record (the ``metrics.jsonl`` line) to :func:`log_scalars`: the loss, its
named parts, the learning rate, the epoch time and the validation metrics become scalars at step
``epoch`` (``train/loss``, ``train/d_self``, ``lr``, ``val/medium/mAP``, ...). Without tensorboard
installed (the ``[report]`` extra brings it) nothing is written and nothing fails; neither does a
writer that cannot write (a training run never stops for its pictures). ``ASYMRET_TENSORBOARD=0``
turns it off.
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_writers: dict[Path, object] = {}
_unavailable = False


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers as TensorBoard tags (nested validation entries flattened with ``/``)."""
    out: dict[str, float] = {}

    def add(prefix: str, value) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            out[prefix] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}/{k}", v)

    for key, value in record.items():
        if key == "epoch":
            continue
        if key == "val":
            add("val", value)
        elif key in ("lr", "time_s"):
            add(key, value)
        else:
            add(f"train/{key}", value)
    return out


def _writer(run_dir: Path):
    global _unavailable
    if _unavailable or os.environ.get("ASYMRET_TENSORBOARD", "1") == "0":
        return None
    if run_dir not in _writers:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            _unavailable = True
            return None
        _writers[run_dir] = SummaryWriter(log_dir=str(run_dir / "tb"))
    return _writers[run_dir]


def log_scalars(run_dir, record: dict, final: bool = False) -> None:
    """Write ``record``'s scalars at step ``record["epoch"]``; ``final`` closes the run's writer."""
    run_dir = Path(run_dir)
    try:
        writer = _writer(run_dir)
        if writer is None:
            return
        step = int(record.get("epoch", 0))
        for tag, value in scalars(record).items():
            writer.add_scalar(tag, value, step)
        writer.flush()
    except Exception as exc:  # noqa: BLE001 - scalars for pictures must never stop a training run
        log.warning("TensorBoard scalars not written to %s: %s", run_dir / "tb", exc)
    if final:
        close(run_dir)


def close(run_dir=None) -> None:
    """Close the writer of ``run_dir`` (every writer when ``None``)."""
    dirs = list(_writers) if run_dir is None else [Path(run_dir)]
    for d in dirs:
        writer = _writers.pop(d, None)
        if writer is not None:
            try:
                writer.close()
            except Exception as exc:  # noqa: BLE001 - at exit, a writer that cannot flush is not worth a traceback
                log.debug("TensorBoard writer of %s not closed cleanly: %s", d, exc)


atexit.register(close)
