"""The evaluators against independent implementations written here the way the references write them.

``_revisitop_map`` follows revisitop's ``compute_ap``/``compute_map`` loop by loop;
``_torchreid_eval`` follows torchreid's ``eval_market1501`` (+ fast-reid's mINP) and
``_veri_official_ap`` the official VeRi ``compute_AP.m``. Rankings come from a full stable argsort.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from asymret.errors import InputError
from asymret.retrieval import metrics as M
from asymret.retrieval import positions as P

# ----------------------------------------------------------------------------- reference implementations


def _compute_ap(ranks, nres):
    ap = 0.0
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * (1.0 / nres) / 2.0
    return ap


def _revisitop_map(ranks, gnd, kappas=(1, 5, 10)):
    """revisitop compute_map: ranks is (db x queries), gnd entries have 'ok' and 'junk'."""
    nq = len(gnd)
    aps, prs, nempty = [], [], 0
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            nempty += 1
            continue
        qgndj = np.array(gnd[i]["junk"])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        aps.append(_compute_ap(pos, len(qgnd)))
        pos = pos + 1
        row = []
        for kappa in kappas:
            if len(pos) == 0:  # truncated ranking without any positive (not reachable in revisitop)
                row.append(0.0)
                continue
            kq = min(max(pos), kappa)
            row.append((pos <= kq).sum() / kq)
        prs.append(row)
    return float(np.sum(aps) / (nq - nempty)), np.sum(prs, axis=0) / (nq - nempty), nq - nempty


def _protocol_gnd(gnd, protocol):
    out = []
    for g in gnd:
        easy, hard, junk = list(g["easy"]), list(g["hard"]), list(g["junk"])
        if protocol == "easy":
            out.append({"ok": easy, "junk": junk + hard})
        elif protocol == "medium":
            out.append({"ok": easy + hard, "junk": junk})
        else:
            out.append({"ok": hard, "junk": junk + easy})
    return out


def _veri_official_ap(good, junk, index):
    """compute_AP.m, line by line."""
    ngood = len(good)
    old_recall, old_precision, ap, intersect, j, good_now = 0.0, 1.0, 0.0, 0, 0, 0
    for n in index:
        flag = n in good
        if flag:
            good_now += 1
        if n in junk:
            continue
        if flag:
            intersect += 1
        recall = intersect / ngood
        precision = intersect / (j + 1)
        ap += (recall - old_recall) * ((old_precision + precision) / 2)
        old_recall, old_precision = recall, precision
        j += 1
        if good_now == ngood:
            break
    return ap


def _torchreid_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=10):
    """torchreid eval_market1501 + fast-reid mINP + official VeRi AP, by the references' loops."""
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap, all_inp, all_off = [], [], [], []
    for q in range(len(q_pids)):
        order = indices[q]
        remove = (g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])
        keep = np.invert(remove)
        raw_cmc = matches[q][keep]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        pos_idx = np.where(raw_cmc == 1)[0]
        all_inp.append(cmc[np.max(pos_idx)] / (np.max(pos_idx) + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_rel = raw_cmc.sum()
        tmp = raw_cmc.cumsum() / (np.arange(len(raw_cmc)) + 1.0) * raw_cmc
        all_ap.append(tmp.sum() / num_rel)
        good = set(np.flatnonzero((g_pids == q_pids[q]) & (g_camids != q_camids[q])))
        junk = set(np.flatnonzero((g_pids == q_pids[q]) & (g_camids == q_camids[q])))
        all_off.append(_veri_official_ap(good, junk, order))
    cmc = np.asarray(all_cmc).astype(np.float64).sum(0) / len(all_cmc)
    return {"mAP": np.mean(all_ap), "mAP_official": np.mean(all_off), "R1": cmc[0], "R5": cmc[4],
            "R10": cmc[9], "mINP": np.mean(all_inp), "queries": len(all_ap)}


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _load_gnd(data, name):
    """``data``: shared/data or its generated twin (the ``groundtruth_data`` fixture)."""
    with open(data / "revisited" / f"gnd_{name}.pkl", "rb") as f:
        return pickle.load(f)


# ----------------------------------------------------------------------------------- revisited tests


def _features_for(gnd, n_db, rng, d=32, signal=0.0):
    """Random features; with ``signal`` > 0 each query leans toward its positives (realistic depths)."""
    db = _unit(rng, n_db, d)
    q = _unit(rng, len(gnd), d)
    if signal:
        for i, g in enumerate(gnd):
            ok = list(g["easy"]) + list(g["hard"])
            if ok:
                q[i] += signal * db[ok].mean(0)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, db


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
@pytest.mark.parametrize("distractors", [0, 3000])
@pytest.mark.parametrize("signal", [0.0, 3.0])
def test_revisited_matches_revisitop(groundtruth_data, name, distractors, signal):
    data = _load_gnd(groundtruth_data, name)
    gnd = data["gnd"]
    rng = np.random.default_rng(len(name) + distractors + int(signal))
    q, db = _features_for(gnd, len(data["imlist"]) + distractors, rng, signal=signal)
    # the product the evaluator computes (queries @ database.T): in float32, db @ q.T rounds differently and
    # swaps near-ties with some BLAS builds and thread counts (numpy 2.4's OpenBLAS 0.3.31, 1 thread: 5e-9 in mAP)
    sim = (q @ db.T).T
    ranks = np.argsort(-sim, axis=0, kind="stable")
    ours = M.evaluate_revisited(gnd, queries=q, database=db)
    from_scores = M.evaluate_revisited(gnd, scores=sim.T)
    from_ranking = M.evaluate_revisited(gnd, ranking=ranks.T)
    assert ours["exact"] and from_ranking["exact"]
    for protocol in M.REVISITED_PROTOCOLS:
        ref_map, ref_pr, n = _revisitop_map(ranks, _protocol_gnd(gnd, protocol))
        for result in (ours, from_scores, from_ranking):
            got = result[protocol]
            assert got["mAP"] == pytest.approx(ref_map, abs=1e-12)
            assert [got["mP@1"], got["mP@5"], got["mP@10"]] == pytest.approx(list(ref_pr), abs=1e-12)
            assert got["queries"] == n
    if name == "roxford5k":
        assert ours["easy"]["queries"] == 68 and ours["medium"]["queries"] == 70


def test_revisited_truncated_ranking_is_flagged_and_scores_missing_positives_as_nothing(groundtruth_data):
    data = _load_gnd(groundtruth_data, "roxford5k")
    gnd = data["gnd"]
    rng = np.random.default_rng(7)
    q, db = _features_for(gnd, len(data["imlist"]), rng, signal=4.0)
    sim = db @ q.T
    ranks = np.argsort(-sim, axis=0, kind="stable")
    k = 300
    truncated = M.evaluate_revisited(gnd, ranking=ranks[:k].T)
    assert truncated["exact"] is False
    for protocol in M.REVISITED_PROTOCOLS:
        ref_map, _, _ = _revisitop_map(ranks[:k], _protocol_gnd(gnd, protocol))
        _, full_pr, _ = _revisitop_map(ranks, _protocol_gnd(gnd, protocol))
        assert truncated[protocol]["mAP"] == pytest.approx(ref_map, abs=1e-12)  # unretrieved positives add nothing
        # mP@k (k <= 300 - junk) does not depend on anything past the cut: exactly the full ranking's
        assert truncated[protocol]["mP@10"] == pytest.approx(full_pr[2], abs=1e-12)
        assert truncated[protocol]["mAP"] <= M.evaluate_revisited(gnd, scores=sim.T)[protocol]["mAP"] + 1e-12


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_mp_at_k_of_a_ranking_truncated_at_100_equals_the_full_rankings(groundtruth_data, name):
    """Random features (positives deep in the ranking): every mP@k from the top 100 is the full ranking's."""
    data = _load_gnd(groundtruth_data, name)
    gnd = data["gnd"]
    q, db = _features_for(gnd, len(data["imlist"]), np.random.default_rng(11))
    sim = (q @ db.T).T
    ranks = np.argsort(-sim, axis=0, kind="stable")
    truncated = M.evaluate_revisited(gnd, ranking=ranks[:100].T)
    assert truncated["exact"] is False  # random features leave positives past 100
    for protocol in M.REVISITED_PROTOCOLS:
        _, full_pr, _ = _revisitop_map(ranks, _protocol_gnd(gnd, protocol))
        got = [truncated[protocol][f"mP@{k}"] for k in (1, 5, 10)]
        assert got == pytest.approx(list(full_pr), abs=1e-12)


def test_mp_at_k_past_a_truncated_list_is_unknown_not_a_number():
    # one query, ranking truncated at 4: junk at 0 and 1, a positive at 2, the other positive not retrieved.
    # After junk removal the retrieved list has 2 items: mP@1 and mP@2 are exact, mP@3 is unknown.
    gnd = [{"easy": [7, 9], "hard": [], "junk": [3, 4]}]
    r = M.evaluate_revisited(gnd, ranking=np.array([[3, 4, 7, 5]]), kappas=(1, 2, 3))["easy"]
    assert r["mP@1"] == pytest.approx(1.0) and r["mP@2"] == pytest.approx(0.5) and r["mP@3"] is None
    from asymret.api.tables import format_revisited

    text = format_revisited(M.evaluate_revisited(gnd, ranking=np.array([[3, 4, 7, 5]]), kappas=(1, 2, 3)))
    assert "n/a" in text and "lower bound" in text
    # nothing retrieved: mP@k is exactly 0 as long as k fits in the retrieved list
    none = M.evaluate_revisited(gnd, ranking=np.array([[0, 1, 2, 5]]), kappas=(1, 4, 5))["easy"]
    assert none["mP@1"] == 0.0 and none["mP@4"] == 0.0 and none["mP@5"] is None


def test_a_top_k_shallower_than_the_deepest_mp_at_k_is_refused():
    from asymret.errors import InputError
    from asymret.retrieval.evaluate import ranking_source

    x = np.eye(4, dtype=np.float32)
    with pytest.raises(InputError, match="--topk 5 is shallower than mP@10"):
        ranking_source(x, x, 5)
    assert ranking_source(x, x, 10)["ranking"].shape == (4, 4)


def test_revisited_hand_computed_cases():
    # db of 6 items; query ranks items in order 0..5 (scores descending)
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    # positives at 0-based positions 1 and 3, junk at 0 -> after removal positives at 0 and 2
    gnd = [{"easy": [1, 3], "hard": [], "junk": [0]}]
    r = M.evaluate_revisited(gnd, scores=scores)["easy"]
    # AP = ((1 + 1/1) + (1/2 + 2/3)) / (2*2)
    assert r["mAP"] == pytest.approx(((1 + 1) + (1 / 2 + 2 / 3)) / 4)
    # mP@1: kq = min(3, 1) = 1 -> 1/1; mP@5 and mP@10: kq = 3 -> 2/3
    assert (r["mP@1"], r["mP@5"], r["mP@10"]) == pytest.approx((1.0, 2 / 3, 2 / 3))
    # fewer positives than k, all first: mP@10 = 1
    r = M.evaluate_revisited([{"easy": [0, 1], "hard": [], "junk": []}], scores=scores)["easy"]
    assert r["mP@10"] == 1.0 and r["mAP"] == 1.0


def test_revisited_no_positive_and_all_junk_queries_are_left_out():
    scores = np.array([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7]])
    gnd = [{"easy": [], "hard": [2], "junk": [0, 1]},  # no easy: left out of Easy; Hard: junk removed
           {"easy": [0], "hard": [], "junk": []}]
    r = M.evaluate_revisited(gnd, scores=scores)
    assert r["easy"]["queries"] == 1 and r["easy"]["mAP"] == 1.0
    assert r["hard"]["queries"] == 1 and r["hard"]["mAP"] == 1.0  # the hard positive rises to the top
    assert r["medium"]["queries"] == 2


def test_ties_follow_database_order_like_a_stable_sort():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(5, 50)).astype(np.float32)  # many ties
    items = [rng.choice(50, size=7, replace=False) for _ in range(5)]
    got = P.positions_from_scores(scores, items)
    for row, idx, pos in zip(scores, items, got):
        order = np.argsort(-row, kind="stable")
        expected = np.argsort(order)[idx]
        assert np.array_equal(pos, expected)


def _stable_positions(row, idx):
    """Reference: positions in ``np.argsort(-row, kind="stable")`` (NaN last, ties by index)."""
    return np.argsort(np.argsort(-row, kind="stable"), kind="stable")[idx]


def _mixed_row(rng, levels):
    """A row spanning several blocks: dense blocks (sorted whole) between sparse ones (cut, pooled)."""
    n = 8 * P.SORT_BLOCK + 1234
    row = rng.standard_normal(n)
    row[P.SORT_BLOCK:3 * P.SORT_BLOCK] += 1.0  # blocks 1-2: ~68 % above the median (sorted whole), others ~30 % (cut)
    if levels:
        row = np.round(row * levels) / levels  # many exact ties, across blocks and groups
    return row.astype(np.float32)


@pytest.mark.parametrize("levels", [None, 50, 3])
def test_blocked_counting_equals_a_stable_argsort(levels):
    """Whole and cut blocks, pooled groups and ties spanning them: positions of a stable argsort."""
    rng = np.random.default_rng(levels or 0)
    row = _mixed_row(rng, levels)
    n = row.size
    shallow = rng.choice(n, 40, replace=False)
    for deepest in (np.argsort(row, kind="stable")[:3],  # a positive scoring lowest of all: every block whole
                    np.flatnonzero(row == np.quantile(row, 0.55, method="nearest"))[:3]):
        idx = np.concatenate([shallow, deepest])
        got = P.positions_from_scores(row[None], [idx])[0]
        assert np.array_equal(got, _stable_positions(row, idx))
        greater, equal = P.count_above(row, row[idx])
        assert np.array_equal(greater, (row[None, :] > row[idx, None]).sum(1))
        assert np.array_equal(equal, (row[None, :] == row[idx, None]).sum(1))


def test_many_ties_at_the_threshold_keep_database_order():
    row = np.zeros(3 * P.SORT_BLOCK, dtype=np.float32)  # every value tied with the deepest item
    row[::7] = 1.0
    idx = np.array([5, 7, P.SORT_BLOCK + 3, 2 * P.SORT_BLOCK + 11, 3 * P.SORT_BLOCK - 1, 14])
    got = P.positions_from_scores(row[None], [idx])[0]
    assert np.array_equal(got, _stable_positions(row, idx))


def test_optional_items_below_every_required_one_are_missing():
    rng = np.random.default_rng(5)
    row = np.round(rng.standard_normal(2 * P.SORT_BLOCK + 77) * 20).astype(np.float64) / 20  # ties
    order = np.argsort(-row, kind="stable")
    required_items = order[[3, 400, 90_000]]
    tied_lower = np.flatnonzero(row == row[order[90_000]])
    junk = np.array([order[10], tied_lower[0], tied_lower[-1], order[90_001], order[-1]])
    idx = np.concatenate([required_items, junk])
    required = np.r_[np.ones(3, bool), np.zeros(junk.size, bool)]
    got = P.positions_from_scores(row[None], [idx], [required])[0]
    expected = _stable_positions(row, idx)
    below = row[idx] < row[required_items].min()  # scoring below every required item: MISSING
    assert np.array_equal(got, np.where(below, P.MISSING, expected))
    assert got[4] < expected[2] < got[5] and got[-1] == P.MISSING  # ties at the threshold stay ranked
    none_required = P.positions_from_scores(row[None], [idx], [np.zeros(idx.size, bool)])[0]
    assert (none_required == P.MISSING).all()


def test_nan_and_infinite_scores_rank_like_argsort_and_nan_items_are_refused():
    rng = np.random.default_rng(9)
    for n in (2 * P.SORT_BLOCK, 1000):  # several blocks, and the single-block path
        row = rng.standard_normal(n)
        row[rng.choice(n, 50, replace=False)] = np.nan
        row[[5, 6, n - 7]] = [np.inf, -np.inf, np.inf]
        finite = np.flatnonzero(np.isfinite(row))
        idx = np.concatenate([rng.choice(finite, 20, replace=False), [5, 6, n - 7]])
        for dtype in (np.float64, np.float32):
            r = row.astype(dtype)
            assert np.array_equal(P.positions_from_scores(r[None], [idx])[0], _stable_positions(r, idx))
        nan_item = np.flatnonzero(np.isnan(row))[:1]
        with pytest.raises(InputError, match="NaN"):
            P.positions_from_scores(row[None], [nan_item])
        optional_nan = P.positions_from_scores(row[None], [np.r_[idx[:1], nan_item]], [np.array([True, False])])[0]
        assert optional_nan[1] == P.MISSING  # junk scoring NaN ranks last: below every positive


def test_integer_and_half_precision_scores_are_ranked_exactly():
    rng = np.random.default_rng(2)
    ints = rng.integers(-50, 50, size=(3, 400))
    halves = rng.standard_normal((3, 400)).astype(np.float16)
    for scores in (ints, halves):
        items = [rng.choice(400, 9, replace=False) for _ in range(3)]
        for row, idx, pos in zip(scores, items, P.positions_from_scores(scores, items)):
            assert np.array_equal(pos, _stable_positions(row.astype(np.float64), idx))


def test_revisited_on_rows_of_several_blocks_matches_revisitop(groundtruth_data):
    """Rows longer than one block (both the whole-block and the cut path) against revisitop's loop."""
    data = _load_gnd(groundtruth_data, "roxford5k")
    gnd = data["gnd"][:12]
    rng = np.random.default_rng(11)
    q, db = _features_for(gnd, len(data["imlist"]) + 2 * P.SORT_BLOCK, rng, d=16, signal=2.0)
    sim = db @ q.T
    ranks = np.argsort(-sim, axis=0, kind="stable")
    ours = M.evaluate_revisited(gnd, scores=sim.T)
    for protocol in M.REVISITED_PROTOCOLS:
        ref_map, ref_pr, n = _revisitop_map(ranks, _protocol_gnd(gnd, protocol))
        assert ours[protocol]["mAP"] == pytest.approx(ref_map, abs=1e-12)
        assert [ours[protocol][f"mP@{k}"] for k in (1, 5, 10)] == pytest.approx(list(ref_pr), abs=1e-12)
        assert ours[protocol]["queries"] == n


def test_positions_from_ranking_marks_missing():
    ranking = np.array([[4, 2, 9, -1]])
    pos = P.positions_from_ranking(ranking, [np.array([9, 4, 7])])[0]
    assert pos.tolist() == [2, 0, P.MISSING]


# ----------------------------------------------------------------------------------------- re-ID tests


def _parse(names):
    ids = np.array([int(n[:4]) for n in names])
    cams = np.array([int(n[6:9]) for n in names])
    return ids, cams


def _read_index_file(path):
    return [np.array([int(v) - 1 for v in line.split()], dtype=np.int64)
            for line in path.read_text().splitlines()]


def test_veri_groundtruth_from_names_equals_official_index_files(groundtruth_data):
    veri = groundtruth_data / "veri776"
    qn = (veri / "name_query.txt").read_text().split()
    gn = (veri / "name_test.txt").read_text().split()
    qid, qcam = _parse(qn)
    gid, gcam = _parse(gn)
    where = {n: i for i, n in enumerate(gn)}
    pos, junk = M.reid_groundtruth(qid, qcam, gid, gcam, query_gallery_index=[where[n] for n in qn])
    gt, jk = _read_index_file(veri / "gt_index.txt"), _read_index_file(veri / "jk_index.txt")
    assert len(pos) == len(gt) == 1678
    for a, b in zip(pos, gt):
        assert np.array_equal(a, np.sort(b))
    for a, b in zip(junk, jk):
        assert np.array_equal(a, np.sort(b))


def test_reid_matches_torchreid_and_official_veri_on_real_lists(groundtruth_data):
    veri = groundtruth_data / "veri776"
    qn = (veri / "name_query.txt").read_text().split()
    gn = (veri / "name_test.txt").read_text().split()
    qid, qcam = _parse(qn)
    gid, gcam = _parse(gn)
    rng = np.random.default_rng(0)
    sel = rng.choice(len(qn), 300, replace=False)  # the official AP loop is slow in pure Python
    qid, qcam = qid[sel], qcam[sel]
    # identity-aware features so positives sit at realistic depths
    centres = _unit(rng, 1000, 24)
    g = centres[gid % 1000] * 0.6 + _unit(rng, len(gid), 24)
    q = centres[qid % 1000] * 0.6 + _unit(rng, len(qid), 24)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sim = q @ g.T
    pos, junk = M.reid_groundtruth(qid, qcam, gid, gcam)
    ours = M.evaluate_reid(pos, junk, scores=sim)
    ref = _torchreid_eval(-sim, qid, gid, qcam, gcam)
    for key in ("mAP", "mAP_official", "R1", "R5", "R10", "mINP"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    assert ours["queries"] == ref["queries"]
    assert ours["mAP_official"] < ours["mAP"]


def test_reid_hand_computed_and_edge_cases():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    # junk at position 0, positives at 1 and 4 -> junk-free ranks 0 and 3
    r = M.evaluate_reid([np.array([1, 4])], [np.array([0])], scores=scores)
    assert r["mAP"] == pytest.approx((1 / 1 + 2 / 4) / 2)
    assert r["mAP_official"] == pytest.approx(((1 + 1) + (1 / 3 + 2 / 4)) / 4)
    assert r["R1"] == 1.0 and r["mINP"] == pytest.approx(2 / 4)
    # a query without positives is skipped; one with every same-id image junk too
    r2 = M.evaluate_reid([np.array([1]), np.array([], int)], [np.array([], int), np.array([0, 2])], scores=np.vstack([scores] * 2))
    assert r2["queries"] == 1 and r2["R1"] == 0.0  # positive at position 1, nothing junk above it
    with pytest.raises(InputError):
        M.evaluate_reid([np.array([], int)], [np.array([0])], scores=scores)


def test_camera_rule_switch_and_galleries_without_cameras():
    qid, gid = np.array([1, 2]), np.array([1, 1, 2, 3])
    qcam, gcam = np.array([0, 0]), np.array([0, 1, 0, 0])
    pos, junk = M.reid_groundtruth(qid, qcam, gid, gcam)
    assert [p.tolist() for p in pos] == [[1], []] and [j.tolist() for j in junk] == [[0], [2]]
    pos, junk = M.reid_groundtruth(qid, qcam, gid, gcam, camera_rule=False)
    assert [p.tolist() for p in pos] == [[0, 1], [2]] and all(j.size == 0 for j in junk)
    pos, junk = M.reid_groundtruth(qid, None, gid, None, query_gallery_index=[0, -1])
    assert [p.tolist() for p in pos] == [[1], [2]] and junk[0].tolist() == [0]


def test_truncated_reid_ranking():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    ranking = np.argsort(-scores, axis=1)[:, :3]
    r = M.evaluate_reid([np.array([1, 4])], [np.array([], int)], ranking=ranking)
    assert r["exact"] is False and r["mAP"] == pytest.approx((1 / 2) / 2) and np.isnan(r["mINP"])


# ------------------------------------------------------------------------------------------ input checks


def test_feature_validation():
    x = np.ones((3, 4), dtype=np.float32)
    with pytest.warns(UserWarning, match="not L2-normalised"):
        y = P.as_features(x, "queries")
    assert np.allclose(np.linalg.norm(y, axis=1), 1)
    x[1, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        P.as_features(x, "queries")
    with pytest.raises(InputError, match="dimension"):
        P.as_features(np.eye(3, dtype=np.float32), "database", dim=4)
    with pytest.raises(InputError, match="2-D"):
        P.as_features(np.ones(3), "database")


def test_memory_bounded_chunks_give_the_same_positions():
    rng = np.random.default_rng(1)
    q, db = _unit(rng, 20, 8), _unit(rng, 500, 8)
    items = [rng.choice(500, 10, replace=False) for _ in range(20)]
    whole = P.positions_from_scores(q @ db.T, items)
    chunked = P.positions_from_features(q, db, items, max_block_bytes=500 * 4 * 3)
    assert all(np.array_equal(a, b) for a, b in zip(whole, chunked))
