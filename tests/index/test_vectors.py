"""VectorIndex: exactness, recall, ids through add/remove/save/load, parameters, errors, GPU."""

from __future__ import annotations

import json
import warnings

import faiss
import numpy as np
import pytest

from asymret.errors import ConfigError, ConflictError, DataError, InputError
from asymret.index.recommend import index_memory, recommend_index
from asymret.index.synthetic import synthetic_embeddings
from asymret.index.vectors import VectorIndex, sidecar_path

from .conftest import brute_force, needs_cuda, unit

DIM = 32


@pytest.fixture(scope="module")
def data():
    """Clustered vectors (ANN behaves as on real embeddings), queries from the same distribution."""
    x = synthetic_embeddings(4000, DIM, seed=1, clusters=32)
    q = synthetic_embeddings(40, DIM, seed=1, clusters=32, start=4000)
    ids = np.random.default_rng(0).choice(2**62, len(x), replace=False).astype(np.int64)
    return x, q, ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_is_exact(data, metric):
    x, q, ids = data
    index = VectorIndex(DIM, "Flat", metric=metric)
    index.add(x, ids)
    want_s, want_rows = brute_force(q, x, 10)
    for queries in (q, q[:3]):  # 40 queries: blocked matrix products; 3: FAISS's own scan
        scores, found = index.search(queries, 10)
        np.testing.assert_array_equal(found, ids[want_rows[:len(queries)]])
        np.testing.assert_allclose(scores, want_s[:len(queries)], atol=1e-5)  # cosine, either metric


@pytest.mark.parametrize("factory, params, min_recall", [
    ("IVF32,Flat", {"nprobe": 32}, 1.0),       # every list probed: exact
    ("IVF32,Flat", {"nprobe": 8}, 0.95),
    ("HNSW16", {"efSearch": 64}, 0.95),
    ("IVF16,PQ16", {"nprobe": 16}, 0.8),        # 2-byte codes per 4 dims: approximate scores
])
def test_approximate_recall(data, factory, params, min_recall):
    x, q, ids = data
    index = VectorIndex(DIM, factory)
    index.add(x, ids)
    _, truth = brute_force(q, x, 10)
    _, found = index.search(q, 10, **params)
    assert recall(found, ids[truth]) >= min_recall


def test_opq_ivf_pq_finds_the_nearest_neighbour():
    x = synthetic_embeddings(1200, 16, seed=2, clusters=8)
    q = synthetic_embeddings(30, 16, seed=2, clusters=8, start=1200)
    index = VectorIndex(16, "OPQ4,IVF8,PQ4")
    index.train(x)
    index.add(x)
    _, truth = brute_force(q, x, 1)
    _, found = index.search(q, 10, nprobe=8)
    assert np.mean([t in f for t, f in zip(truth[:, 0], found)]) >= 0.9


def test_search_parameters_apply_to_one_call_only(data):
    x, q, ids = data
    index = VectorIndex(DIM, "IVF32,Flat")
    index.add(x, ids)
    default = index.search(q, 10)[1]
    _, one_list = index.search(q, 10, nprobe=1)
    _, truth = brute_force(q, x, 10)
    assert recall(one_list, ids[truth]) < recall(default, ids[truth])
    np.testing.assert_array_equal(index.search(q, 10)[1], default)
    with pytest.raises(InputError, match="efSearch"):
        index.search(q, 10, efSearch=32)
    with pytest.raises(InputError, match="nprobe"):
        VectorIndex(DIM, "Flat").search(q, 1, nprobe=4)


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW8"])
@pytest.mark.parametrize("mmap", [False, True])
def test_ids_survive_remove_save_load(tmp_path, data, factory, mmap):
    x, q, ids = data
    index = VectorIndex(DIM, factory)
    index.add(x[:3000], ids[:3000])
    index.add(x[3000:], ids[3000:])
    gone = ids[::7]  # 1/7 removed: HNSW keeps them as dead entries (no compaction below 1/4)
    assert index.remove(np.concatenate([gone, [12345]])) == len(gone)  # an absent id is ignored
    live = np.setdiff1d(ids, gone)
    np.testing.assert_array_equal(index.ids(), live)
    index.save(tmp_path / "v.faiss")
    loaded = VectorIndex.load(tmp_path / "v.faiss", dim=DIM, metric="ip", mmap=mmap)
    np.testing.assert_array_equal(loaded.ids(), live)
    assert len(loaded) == len(live) and loaded.readonly == mmap
    before, after = index.search(q, 20, nprobe=16) if "IVF" in factory else index.search(q, 20), None
    after = loaded.search(q, 20, nprobe=16) if "IVF" in factory else loaded.search(q, 20)
    np.testing.assert_array_equal(before[1], after[1])
    assert not np.isin(after[1], gone).any()
    if factory != "IVF16,Flat":  # exhaustive enough to check: what remains is found exactly
        kept = np.isin(ids, live)
        _, truth = brute_force(q, x[kept], 20)
        assert recall(after[1], ids[kept][truth]) >= 0.95
    meta = json.loads(sidecar_path(tmp_path / "v.faiss").read_text())
    assert (meta["dim"], meta["metric"], meta["factory"], meta["count"]) == (DIM, "ip", factory, len(live))


def test_hnsw_compacts_when_a_quarter_is_dead(data):
    x, q, ids = data
    index = VectorIndex(DIM, "HNSW8")
    index.add(x, ids)
    index.remove(ids[:900])
    assert index.info()["dead"] == 900
    index.remove(ids[900:1200])  # 1200 of 4000 > 1/4: rebuilt without them
    assert index.info()["dead"] == 0 and index._index.ntotal == 2800
    _, found = index.search(q, 10)
    _, truth = brute_force(q, x[1200:], 10)
    assert recall(found, ids[1200:][truth]) >= 0.95


def test_duplicate_and_bad_ids(data):
    x, _, ids = data
    index = VectorIndex(DIM, "Flat")
    index.add(x[:10], ids[:10])
    with pytest.raises(ConflictError, match="already in the index"):
        index.add(x[10:12], [ids[11], ids[3]])
    with pytest.raises(ConflictError, match="twice"):
        index.add(x[10:12], [7, 7])
    with pytest.raises(InputError, match="non-negative"):
        index.add(x[10:11], [-5])
    with pytest.raises(InputError, match="one id per vector"):
        index.add(x[10:13], [1, 2])
    assert len(index) == 10
    np.testing.assert_array_equal(index.add(x[10:12]), [ids[:10].max() + 1, ids[:10].max() + 2])


def test_k_larger_than_the_index():
    index = VectorIndex(8, "Flat")
    empty_s, empty_i = index.search(unit(2, 8), 5)
    assert empty_s.shape == empty_i.shape == (2, 0)
    index.add(unit(3, 8), [10, 20, 30])
    scores, ids = index.search(unit(2, 8, seed=9), 50)
    assert ids.shape == (2, 3) and set(ids[0]) == {10, 20, 30}
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_ivf_with_few_candidates_pads_with_minus_one():
    x = unit(400, 8, seed=3)
    index = VectorIndex(8, "IVF16,Flat")
    index.add(x)
    scores, ids = index.search(unit(5, 8, seed=4), 300, nprobe=1)  # one list holds ~25 vectors
    assert (ids == -1).any() and np.all(scores[ids == -1] == -np.inf)
    assert np.all(scores[ids >= 0] > -np.inf)


def test_normalises_and_warns_once():
    index = VectorIndex(8, "Flat")
    x = unit(20, 8) * 3.0
    with pytest.warns(UserWarning, match="not L2-normalised"):
        index.add(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores, ids = index.search(x[:2] * 5, 1)  # scaled again: still no second warning
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    np.testing.assert_array_equal(ids[:, 0], [0, 1])
    with pytest.raises(InputError, match="all zeros"):
        index.add(np.zeros((1, 8)))
    with pytest.raises(InputError, match="NaN"):
        index.search(np.full((1, 8), np.nan), 1)
    with pytest.raises(InputError, match=r"shape \(n, 8\)"):
        index.add(unit(2, 9))


def test_training_needs_enough_vectors():
    index = VectorIndex(8, "IVF64,Flat")
    assert index.training_size() == (64, 64 * 39)
    with pytest.raises(InputError, match="at least 64 training vectors"):
        index.add(unit(20, 8))
    index.add(unit(100, 8))  # trains on this batch first
    assert index.is_trained and len(index) == 100


def test_bad_factory_metric_device():
    with pytest.raises(ConfigError, match="IVF4096,Flat"):
        VectorIndex(8, "Bogus,Thing")
    with pytest.raises(ConfigError, match="multiple of the number of subquantizers"):
        VectorIndex(10, "IVF8,PQ3")
    with pytest.raises(ConfigError, match="metric"):
        VectorIndex(8, "Flat", metric="cosine")
    with pytest.raises(ConfigError, match="device"):
        VectorIndex(8, "Flat", device="tpu")


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the no-GPU message")
def test_cuda_without_faiss_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch CUDA present: Flat would use the torch fallback")
    with pytest.raises(ConfigError, match="device 'cuda'"):
        VectorIndex(8, "Flat", device="cuda")
    assert VectorIndex(8, "Flat", device="auto").info()["device"] == "cpu"


def test_load_checks_dimension_metric_and_files(tmp_path):
    index = VectorIndex(8, "Flat", metric="l2")
    index.add(unit(5, 8))
    path = tmp_path / "v.faiss"
    index.save(path)
    with pytest.raises(ConflictError, match="dim 8, not 16"):
        VectorIndex.load(path, dim=16)
    with pytest.raises(ConflictError, match="metric l2, not ip"):
        VectorIndex.load(path, metric="ip")
    other = VectorIndex(4, "Flat")
    other.save(tmp_path / "w.faiss")
    (tmp_path / "w.faiss").replace(path)  # index file of another save, sidecar of this one
    with pytest.raises(DataError, match="different saves"):
        VectorIndex.load(path)
    with pytest.raises(DataError, match="sidecar not found"):
        VectorIndex.load(tmp_path / "nothing.faiss")


def test_mmap_index_is_read_only(tmp_path):
    index = VectorIndex(8, "Flat")
    index.add(unit(50, 8))
    index.save(tmp_path / "v.faiss")
    mapped = VectorIndex.load(tmp_path / "v.faiss", mmap=True)
    assert mapped.readonly
    with pytest.raises(ConflictError, match="mmap=False"):
        mapped.add(unit(1, 8, seed=5))
    with pytest.raises(ConflictError, match="mmap=False"):
        mapped.remove([0])
    np.testing.assert_array_equal(mapped.search(unit(30, 8), 5)[1], index.search(unit(30, 8), 5)[1])


@pytest.mark.parametrize("n, dim, budget, expected", [
    (50_000, 512, 1 << 30, "Flat"),
    (1_000_000, 512, 8 << 30, "IVF4096,Flat"),
    (1_000_000, 512, 200 << 20, "IVF4096,PQ128"),
    (10_000_000, 512, 1 << 30, "OPQ64,IVF16384,PQ64"),
    (300_000, 48, 10 << 20, "IVF2048,PQ24"),
    (1_000_000, 2048, 1 << 30, "IVF4096,PQ256"),  # no OPQ at 2048-d: its training is too slow
])
def test_recommend_index(n, dim, budget, expected):
    factory, reason = recommend_index(n, dim, budget)
    assert factory == expected and f"{n:,}" in reason
    assert index_memory(n, dim, factory) <= budget
    VectorIndex(dim, factory)  # FAISS can build it


def test_recommend_index_refuses_an_impossible_budget():
    with pytest.raises(InputError, match="raise the memory budget"):
        recommend_index(10_000_000, 512, 1 << 20)


def test_index_memory_matches_faiss_within_a_tenth():
    x = unit(3000, 32, seed=6)
    for factory in ("Flat", "IVF32,Flat", "IVF32,PQ8", "HNSW16"):
        index = VectorIndex(32, factory)
        index.add(x)
        serialized = faiss.serialize_index(index._index).nbytes
        assert abs(index_memory(len(x), 32, factory) - serialized) <= 0.1 * serialized, factory


@pytest.mark.gpu
@needs_cuda
def test_gpu_search_matches_cpu(data):
    x, q, ids = data
    for factory, params in (("Flat", {}), ("IVF32,Flat", {"nprobe": 32})):
        cpu, gpu = VectorIndex(DIM, factory), VectorIndex(DIM, factory, device="cuda")
        for index in (cpu, gpu):
            index.add(x, ids)
        assert gpu.info()["device"] in ("faiss", "torch")
        if factory != "Flat" and gpu.info()["device"] == "torch":
            continue  # torch only serves Flat; IVF stays on CPU
        cpu_s, cpu_i = cpu.search(q, 10, **params)
        gpu_s, gpu_i = gpu.search(q, 10, **params)
        np.testing.assert_array_equal(gpu_i, cpu_i)
        np.testing.assert_allclose(gpu_s, cpu_s, atol=1e-4)
