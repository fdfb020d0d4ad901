"""The bundled mini benchmarks, rendered from the photographs inside scikit-image in the real datasets'
on-disk formats, so the real readers of :mod:`asymret.retrieval.datasets` open them unchanged.

A package beside the layers: it writes files and imports only the dataset formats (``cid2filename``) from
``retrieval``; ``api`` (``asymret demo``, ``asymret data``), the tests and ``experiments/`` use it.

- :mod:`~asymret.mini.scene`: photographs, regions, view classes, tones, cameras and the geometry of one render;
- :mod:`~asymret.mini.build`: the process pool, the size check and the completion marker every builder shares;
- :mod:`~asymret.mini.benchmark`: mini-roxford (+ distractors), mini-sfm and mini-veri (``asymret data mini``);
- :mod:`~asymret.mini.acd`: mini-msmt17, mini-inshop, mini-sop and mini-cub200 (``asymret data mini-acd``).
"""

from asymret.mini.acd import build_mini_acd, ensure_mini_acd
from asymret.mini.benchmark import build_mini, ensure_mini

__all__ = ["build_mini", "build_mini_acd", "ensure_mini", "ensure_mini_acd"]
