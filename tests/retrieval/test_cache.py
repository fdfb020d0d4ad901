"""The embedding cache: computed once, memory-mapped, and a new entry whenever a key part changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from asymret.retrieval import cache as cache_mod
from asymret.retrieval.cache import EmbeddingCache, cache_key
from asymret.retrieval.encoders import create_encoder
from asymret.retrieval.records import ImageRecord

SPEC = {"backbone": "resnet18", "dim": 8, "input": {"size": 32}}


@pytest.fixture
def records(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(path)
        out.append(ImageRecord(path))
    return out


def test_computed_once_then_memory_mapped(tmp_path, records, monkeypatch):
    net = create_encoder(SPEC).eval()
    cache = EmbeddingCache(tmp_path / "cache")
    first = cache.get(net, records, num_workers=0, progress=False)
    assert isinstance(first, np.memmap) and first.shape == (5, 8)
    expected = net.encode_batch(torch.stack([net.transform(Image.open(r.path).convert("RGB")) for r in records]))
    assert np.allclose(first, expected.numpy(), atol=1e-5)
    calls = []
    monkeypatch.setattr(cache_mod, "encode_records", lambda *a, **k: calls.append(1))
    again = cache.get(net, records, num_workers=0, progress=False)
    assert not calls and np.array_equal(first, again)


def test_key_changes_with_weights_spec_and_images(records):
    torch.manual_seed(0)
    net = create_encoder(SPEC)
    key = cache_key(net, records)
    assert cache_key(net, list(records)) == key  # stable
    with torch.no_grad():
        next(net.parameters()).add_(1e-3)
    assert cache_key(net, records) != key  # weights
    torch.manual_seed(0)
    net = create_encoder(SPEC)
    assert cache_key(net, records) == key
    net.spec = net.spec.model_copy(update={"input": net.spec.input.model_copy(update={"size": 48})})
    assert cache_key(net, records) != key  # input spec
    torch.manual_seed(0)
    net = create_encoder(SPEC)
    assert cache_key(net, records[:4]) != key  # image list
    boxed = [ImageRecord(records[0].path, bbx=(0, 0, 10, 10))] + records[1:]
    assert cache_key(net, boxed) != key  # query crop


def test_named_arrays_are_computed_once_and_an_interrupted_entry_leaves_nothing(tmp_path):
    cache, calls = EmbeddingCache(tmp_path / "cache"), []

    def compute(folder):
        calls.append(folder)
        raw = np.lib.format.open_memmap(folder / "raw.npy", "w+", np.float32, (3, 2))
        raw[:] = np.arange(6).reshape(3, 2)
        raw.flush()
        np.save(folder / "local2.npy", np.ones((3, 4, 2), np.float16))
        return {"count": 3}

    first = cache.get_arrays("k", ["raw", "local2"], compute)
    assert isinstance(first["raw"], np.memmap) and first["local2"].dtype == np.float16
    assert np.array_equal(first["raw"], np.arange(6).reshape(3, 2)) and first["local2"].shape == (3, 4, 2)
    again = cache.get_arrays("k", ["raw", "local2"], compute)
    assert len(calls) == 1 and np.array_equal(again["raw"], first["raw"])
    assert (tmp_path / "cache" / "k" / "meta.json").is_file()

    def broken(folder):
        np.save(folder / "raw.npy", np.zeros(2))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_arrays("other", ["raw"], broken)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["k"]  # no half-written entry
