"""``asymret evaluate features``: JSON shape, agreement with the metric functions, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from asymret.api.cli import main
from asymret.retrieval import metrics
from asymret.retrieval.datasets import read_gnd


def unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def revisited(tmp_path, groundtruth_data):
    rng = np.random.default_rng(0)
    gnd = groundtruth_data / "revisited" / "gnd_roxford5k.pkl"
    paths = {}
    for name, n in (("q", 70), ("x", 4993), ("d", 500)):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], unit(rng, n))
    return gnd, paths


def run_json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_revisited_json_matches_metrics_with_and_without_distractors(revisited, capsys):
    gnd, p = revisited
    base = ["evaluate", "features", "--protocol", "revisited", "--gnd", str(gnd),
            "--queries", str(p["q"]), "--database", str(p["x"])]
    out = run_json(capsys, base)
    assert set(out) == {"easy", "medium", "hard"}
    for v in out.values():
        assert set(v) == {"mAP", "mP@1", "mP@5", "mP@10", "queries"}
        assert all(0 <= v[k] <= 1 for k in ("mAP", "mP@1", "mP@5", "mP@10"))
    db = np.load(p["x"])
    expected = metrics.evaluate_revisited(read_gnd(gnd)["gnd"], queries=np.load(p["q"]), database=db)
    assert out["medium"]["mAP"] == expected["medium"]["mAP"]  # full float precision
    with_d = run_json(capsys, base + ["--distractors", str(p["d"])])
    expected = metrics.evaluate_revisited(read_gnd(gnd)["gnd"], queries=np.load(p["q"]),
                                          database=np.concatenate([db, np.load(p["d"])]))
    assert with_d["hard"]["mAP"] == expected["hard"]["mAP"]
    assert main(base) == 0
    table = capsys.readouterr().out
    assert "medium" in table and f"{100 * out['medium']['mAP']:.2f}" in table


def test_veri_and_generic_reid_agree(tmp_path, groundtruth_data, capsys):
    rng = np.random.default_rng(1)
    veri = groundtruth_data / "veri776"
    qn = (veri / "name_query.txt").read_text().split()
    gn = (veri / "name_test.txt").read_text().split()
    np.save(tmp_path / "q.npy", unit(rng, len(qn)))
    np.save(tmp_path / "x.npy", unit(rng, len(gn)))
    feats = ["--queries", str(tmp_path / "q.npy"), "--database", str(tmp_path / "x.npy")]
    out = run_json(capsys, ["evaluate", "features", "--protocol", "veri776", "--query-names",
                            str(veri / "name_query.txt"), "--gallery-names", str(veri / "name_test.txt")] + feats)
    assert set(out) == {"mAP", "mAP_official", "R1", "R5", "R10", "mINP", "queries"} and out["queries"] == 1678
    # the same data as generic CSVs (identity,camera,path) gives the same numbers
    for name, names in (("q.csv", qn), ("g.csv", gn)):
        rows = [f"{int(n[:4])},{int(n[6:9])},{n}" for n in names]
        (tmp_path / name).write_text("identity,camera,path\n" + "\n".join(rows) + "\n")
    generic = run_json(capsys, ["evaluate", "features", "--protocol", "reid", "--query-meta",
                                str(tmp_path / "q.csv"), "--gallery-meta", str(tmp_path / "g.csv")] + feats)
    assert generic == out


@pytest.mark.parametrize("case, message", [
    ("wrong_rows", "queries has 69 rows but gnd_roxford5k.pkl"),
    ("nan", "NaN"),
    ("other_gnd", "database has 4993 rows but gnd_rparis6k.pkl"),
    ("missing", "queries file not found"),
    ("no_gnd", "needs --gnd"),
])
def test_bad_input_is_one_line_error(revisited, groundtruth_data, tmp_path, capsys, case, message):
    gnd, p = revisited
    q = p["q"]
    if case == "wrong_rows":
        np.save(q, np.load(q)[:69])
    elif case == "nan":
        a = np.load(q)
        a[5] = np.nan
        np.save(q, a)
    elif case == "other_gnd":
        gnd = groundtruth_data / "revisited" / "gnd_rparis6k.pkl"
    elif case == "missing":
        q = tmp_path / "absent.npy"
    argv = ["evaluate", "features", "--protocol", "revisited", "--queries", str(q), "--database", str(p["x"])]
    if case != "no_gnd":
        argv += ["--gnd", str(gnd)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_unnormalised_rows_are_normalised_with_a_warning(revisited, capsys):
    gnd, p = revisited
    out = run_json(capsys, ["evaluate", "features", "--protocol", "revisited", "--gnd", str(gnd),
                            "--queries", str(p["q"]), "--database", str(p["x"])])
    np.save(p["q"], np.load(p["q"]) * 3.0)
    assert main(["evaluate", "features", "--protocol", "revisited", "--gnd", str(gnd), "--queries",
                 str(p["q"]), "--database", str(p["x"]), "--json"]) == 0
    captured = capsys.readouterr()
    assert "warning: queries: 70 of 70 rows were not L2-normalised" in captured.err
    assert json.loads(captured.out)["medium"]["mAP"] == pytest.approx(out["medium"]["mAP"], abs=1e-12)
