"""``asymret demo --quick`` runs the whole flow; ``asymret evaluate --pair`` reproduces its table."""

from __future__ import annotations

import json

import pytest

from asymret.api.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out


def test_quick_demo_then_evaluate_pair(demo, capsys):
    assert main(["demo", "--quick", "--out", str(demo), "--json"]) == 0
    table = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = ("gallery", "asymmetric_untrained", "asymmetric", "symmetric")
    assert set(table) == {*rows, "distractors", "cost"}
    for row in rows:
        assert set(table[row]) == {"easy", "medium", "hard", "whitening"} and table[row]["whitening"] is None
        assert all(0 <= table[row][p]["mAP"] <= 1 for p in ("easy", "medium", "hard"))
    assert table["distractors"] == 6  # the tiny mini benchmark's distractor list
    q, g = table["cost"]["query_net"], table["cost"]["gallery_net"]
    assert q["params"] == g["params"] > 2_000_000  # one MobileNetV2-1.0 backbone on each side
    assert 0 < q["gflops"] <= g["gflops"] / 4 and 0.5 < g["gflops"] < 0.7  # 224 px MobileNetV2: ~0.6 GFLOPs
    run = demo / "runs" / "query_regression"
    assert (run / "pair.pt").is_file() and (run / "metrics.jsonl").is_file()
    # the pair file alone reproduces the demo's rows (the pretrained gallery network travels inside it)
    argv = ["evaluate", "--pair", str(run / "pair.pt"), "--benchmark", "mini-roxford",
            "--root", str(demo / "data" / "mini-roxford"), "--distractors",
            str(demo / "data" / "mini-roxford" / "revisitop1m" / "revisitop1m.txt"), "--device", "cpu", "--json"]
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    for row in ("gallery", "symmetric", "asymmetric"):
        assert again[row]["medium"]["mAP"] == pytest.approx(table[row]["medium"]["mAP"], abs=1e-6)
    assert again["cost"] == table["cost"]  # evaluate --json carries the same cost fields as the demo
    assert again["dataset"] == "mini-roxford" and again["precision"] == "fp32"
    assert main(argv[:-1] + ["--rows", "asymmetric"]) == 0
    printed = capsys.readouterr().out
    assert "asymmetric (φq / φg)" in printed and "symmetric (φq / φq)" not in printed
    assert "query-side params" in printed and "0.049" in printed
    # the label is what was read: the mini folder's gnd_mini-roxford.pkl, whatever --benchmark said
    assert main(argv[:3] + ["--benchmark", "roxford5k"] + argv[5:-1] + ["--rows", "asymmetric"]) == 0
    assert capsys.readouterr().out.startswith("mini-roxford (read from --root; asked: roxford5k): query network")
    # --amp (bf16 autocast) only acts on CUDA: on the CPU the numbers are the fp32 ones
    assert main(argv + ["--rows", "asymmetric", "--amp"]) == 0
    amp = json.loads(capsys.readouterr().out)
    assert amp["asymmetric"]["medium"]["mAP"] == again["asymmetric"]["medium"]["mAP"]


def test_quick_demo_table_shows_cost_beside_each_row(demo, capsys):
    assert main(["demo", "--quick", "--out", str(demo)]) == 0  # reuses the rendered data
    out = capsys.readouterr().out
    assert "query-side params" in out and "GFLOPs" in out and "6 distractors" in out
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert lines["gallery network alone (φg / φg)"].split()[-1] == "0.599"
    assert float(lines["untrained query network (φq⁰ / φg)"].split()[-1]) < 0.15


def test_evaluate_pair_errors(demo, capsys):
    assert main(["evaluate", "--pair", str(demo / "missing.pt"), "--benchmark", "mini-roxford",
                 "--root", str(demo)]) == 2
    assert "pair file not found" in capsys.readouterr().err
    assert main(["evaluate", "--benchmark", "mini-roxford"]) == 2
    assert "give --pair" in capsys.readouterr().err


def test_demo_threads_and_configs(tmp_path):
    from asymret.api.commands.demo import FULL, cpu_threads, demo_config
    from asymret.errors import InputError
    from asymret.retrieval.checkpoints import MOBILENETV2_IMAGENET
    from asymret.training.config import ExperimentConfig

    assert cpu_threads(3) == 3 and cpu_threads(None) >= 1
    with pytest.raises(InputError, match="--threads"):
        cpu_threads(0)
    mini = {"train_pkl": tmp_path / "mini-sfm.pkl", "train_images": tmp_path / "ims", "roxford": tmp_path}
    cfg = ExperimentConfig.model_validate(demo_config(tmp_path, False, mini))
    # one pretrained backbone, the gallery side at full resolution, the query side at a quarter of it or less
    assert cfg.gallery_net.weights == cfg.query_net.weights == MOBILENETV2_IMAGENET
    assert cfg.gallery_net.input.size == FULL["gallery_size"] >= 2 * cfg.query_net.input.size
    assert cfg.gallery_frozen and cfg.loss.name == "regression" and not cfg.data.augment.enabled
    assert cfg.train.validate_every == 0  # no epoch is chosen on the test queries
    assert demo_config(tmp_path, False, mini, query_epochs=3)["train"]["epochs"] == 3
    assert demo_config(tmp_path, False, mini, loss="triplet")["loss"]["name"] == "triplet"
