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
    assert set(table) == {"gallery", "symmetric", "asymmetric"}
    for row in table.values():
        assert set(row) == {"easy", "medium", "hard"}
        assert all(0 <= row[p]["mAP"] <= 1 for p in row)
    run = demo / "runs" / "query_contr_plus"
    assert (run / "pair.pt").is_file() and (run / "metrics.jsonl").is_file()
    # the gallery network of the pair is the one trained in step 2, loaded from its weights file
    argv = ["evaluate", "--pair", str(run / "pair.pt"), "--benchmark", "mini-roxford",
            "--root", str(demo / "data" / "mini-roxford"), "--device", "cpu", "--json"]
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    for row in table:
        assert again[row]["medium"]["mAP"] == pytest.approx(table[row]["medium"]["mAP"], abs=1e-6)
    assert main(argv[:-1] + ["--rows", "asymmetric"]) == 0
    printed = capsys.readouterr().out
    assert "asymmetric (φq / φg)" in printed and "symmetric (φq / φq)" not in printed


def test_evaluate_pair_errors(demo, capsys):
    assert main(["evaluate", "--pair", str(demo / "missing.pt"), "--benchmark", "mini-roxford",
                 "--root", str(demo)]) == 2
    assert "pair file not found" in capsys.readouterr().err
    assert main(["evaluate", "--benchmark", "mini-roxford"]) == 2
    assert "give --pair" in capsys.readouterr().err


def test_demo_threads_and_configs(tmp_path):
    from asymret.api.commands.demo import FULL, cpu_threads, demo_configs
    from asymret.errors import InputError
    from asymret.training.config import ExperimentConfig

    assert cpu_threads(3) == 3 and cpu_threads(None) >= 1
    with pytest.raises(InputError, match="--threads"):
        cpu_threads(0)
    mini = {"train_pkl": tmp_path / "mini-sfm.pkl", "train_images": tmp_path / "ims", "roxford": tmp_path}
    gallery, query = (ExperimentConfig.model_validate(c) for c in demo_configs(tmp_path, tmp_path, False, mini))
    # square inputs (one batch per step), augmentation for the gallery only, the query against the gallery
    assert gallery.query_net.input.size == (FULL["gallery_size"],) * 2 and gallery.data.augment.enabled
    assert query.query_net.input.size == (FULL["query_size"],) * 2 and not query.data.augment.enabled
    assert query.gallery_net.weights == str(tmp_path / "gallery" / "query_net.pt")
    assert demo_configs(tmp_path, tmp_path, False, mini, query_epochs=3)[1]["train"]["epochs"] == 3
