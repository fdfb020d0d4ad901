"""What an encoder costs per image: parameters and FLOPs at its own input size.

FLOPs come from torch's own counter (``torch.utils.flop_counter.FlopCounterMode``), which counts the
matrix products and convolutions of one forward pass, a multiply-add as 2 FLOPs (elementwise work,
pooling and normalisation are not counted: they are a few percent for CNNs). An encoder whose input
size is one int (the retrieval convention: the longer side) is counted on a square image of that side,
the most a database or query image of that size can cost; several ``scales`` add up.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from asymret.retrieval.encoders import Encoder, eval_mode


def input_hw(encoder: Encoder) -> tuple[int, int]:
    """The ``(height, width)`` the encoder's FLOPs are counted at (a square of the longer side for an int)."""
    size = encoder.spec.input.size
    return (size, size) if isinstance(size, int) else tuple(size)


def count_params(encoder: Encoder) -> int:
    """Parameters that compute the embedding: everything but a re-ID identity classifier (training only)."""
    skip = set()
    if encoder.head is not None and encoder.head.classifier is not None:
        skip = {id(p) for p in encoder.head.classifier.parameters()}
    return sum(p.numel() for p in encoder.parameters() if id(p) not in skip)


def count_flops(encoder: Encoder) -> int:
    """FLOPs of one image's embedding at every scale of ``spec.input.scales``."""
    h, w = input_hw(encoder)
    device = next(encoder.parameters()).device
    total = 0
    with eval_mode(encoder), torch.no_grad():
        for scale in encoder.spec.input.scales:
            x = torch.zeros(1, 3, max(1, round(h * scale)), max(1, round(w * scale)), device=device)
            counter = FlopCounterMode(display=False)
            with counter:
                encoder(x)
            total += counter.get_total_flops()
    return total


def encoder_cost(encoder: Encoder) -> dict:
    """``{"params", "gflops", "input"}`` of one encoder (``input``: the ``[height, width]`` counted)."""
    return {"params": count_params(encoder), "gflops": count_flops(encoder) / 1e9, "input": list(input_hw(encoder))}


def pair_cost(query_net: Encoder, gallery_net: Encoder) -> dict:
    """``{"query_net": cost, "gallery_net": cost}``: what each side of a pair costs per image."""
    return {"query_net": encoder_cost(query_net), "gallery_net": encoder_cost(gallery_net)}
