"""``asymret sweep``: a 2-point grid over a shipped mini config on tiny data, trained, evaluated, tabulated,
resumed without retraining, and the errors a sweep file can cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from asymret.api.cli import main
from asymret.errors import ConfigError
from asymret.mini import ensure_mini
from asymret.training import sweep as S
from asymret.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return ensure_mini(tmp_path_factory.mktemp("mini"), size="tiny")


def write_sweep(path: Path, mini: dict, out: Path, grid, **extra) -> Path:
    """A sweep over configs/mini/contr_plus.yaml, its data and sizes turned to the tiny benchmark (1 epoch, 2 steps)."""
    doc = {"base": str(ROOT / "configs/mini/contr_plus.yaml"), "name": "margins", "output_dir": str(out),
           "overrides": {"data.pkl": str(mini["train_pkl"]), "data.root": str(mini["train_images"]),
                         "data.num_workers": 0, "eval.root": str(mini["roxford"]), "gallery_net.weights": None,
                         "query_net.input.size": [32, 32], "gallery_net.input.size": [32, 32],
                         "train.epochs": 1, "train.batch_size": 2, "train.validate_every": 0,
                         "train.mining": {"tuples_per_epoch": 4, "num_negatives": 1, "pool_size": 8}},
           "grid": grid, **extra}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_two_point_sweep_trains_evaluates_and_collects_one_table(mini, tmp_path, monkeypatch, capsys):
    path = write_sweep(tmp_path / "margins.yaml", mini, tmp_path / "out", {"loss.params.margin": [0.5, 0.9]},
                       metrics=["asymmetric.medium.mAP", "symmetric.medium.mAP", "train.loss", "train.d_neg"])
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "| margin=0.5 | 0.5 | train |" in out and "| margin=0.9 | 0.9 | train |" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing

    assert main(["sweep", str(path), "--no-progress"]) == 0
    folder = tmp_path / "out" / "margins"
    table = json.loads((folder / "margins.json").read_text())
    assert [r["run"] for r in table["rows"]] == ["margin=0.5", "margin=0.9"]
    assert table["evaluation"]["benchmark"] == "mini-roxford" and table["evaluation"]["rows"] == ["symmetric", "asymmetric"]
    for row, margin in zip(table["rows"], (0.5, 0.9)):
        run = folder / row["run"]
        assert yaml.safe_load((run / "config.yaml").read_text())["loss"]["params"] == {"margin": margin}
        stored = json.loads((run / S.EVAL_FILE).read_text())["results"]
        assert row["metrics"]["asymmetric.medium.mAP"] == stored["asymmetric"]["medium"]["mAP"]
        assert 0 <= row["metrics"]["symmetric.medium.mAP"] <= 1
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert row["metrics"]["train.loss"] == last["loss"] and row["metrics"]["train.d_neg"] == last["d_neg"]
    md = (folder / "margins.md").read_text()
    assert "| run | loss.params.margin | asymmetric.medium.mAP | symmetric.medium.mAP | train.loss | train.d_neg |" in md
    mAP = table["rows"][0]["metrics"]["asymmetric.medium.mAP"]
    assert f"| margin=0.5 | 0.5 | {100 * mAP:.2f} |" in md

    # resumable: a second call trains and evaluates nothing and gives the same table
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(S, "evaluate_run", lambda *a, **k: pytest.fail("a finished run was evaluated again"))
    assert S.run_sweep(path)["rows"] == table["rows"]
    # a run whose evaluation is missing is evaluated again, not retrained
    (folder / "margin=0.9" / S.EVAL_FILE).unlink()
    monkeypatch.undo()
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("a trained run was trained again"))
    assert [r["status"] for r in S.run_sweep(path, dry_run=True)["rows"]] == ["done", "evaluate"]
    assert S.run_sweep(path)["rows"] == table["rows"]


def test_points_of_one_config_share_a_run_and_an_interrupted_run_resumes(mini, tmp_path):
    path = write_sweep(tmp_path / "s.yaml", mini, tmp_path / "out",
                       [{"train.optim.lr": [1.0e-3, 1.0e-4]}, {"seed": [0]}])  # lr 1e-3 and seed 0: the base's
    _, _, runs = S.plan(path)
    assert [r.name for r in runs] == ["lr=0.001", "lr=0.0001", "seed=0"]
    assert runs[2].same_as == "lr=0.001" and runs[2].run_dir == runs[0].run_dir
    # an interrupted run (checkpoint, no pair.pt) resumes
    Trainer(runs[0].cfg, progress=False).fit()
    (runs[0].run_dir / "pair.pt").unlink()
    assert [S.status(r) for r in runs] == ["resume", "train", "shared"]


def test_an_interrupted_sweep_leaves_the_rows_it_finished(mini, tmp_path, monkeypatch):
    path = write_sweep(tmp_path / "s.yaml", mini, tmp_path / "out", {"loss.params.margin": [0.5, 0.9]})
    fit = Trainer.fit

    def interrupted(self, resume=False):
        if self.cfg.name == "margin=0.9":
            raise KeyboardInterrupt
        return fit(self, resume=resume)

    monkeypatch.setattr(Trainer, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        S.run_sweep(path, progress=False)
    rows = json.loads((tmp_path / "out" / "margins" / "margins.json").read_text())["rows"]
    assert rows[0]["metrics"]["asymmetric.medium.mAP"] is not None
    assert set(rows[1]["metrics"].values()) == {None}
    assert "| margin=0.9 | 0.9 | - | - |" in (tmp_path / "out" / "margins" / "margins.md").read_text()


def test_a_folder_of_another_config_is_never_reused(mini, tmp_path):
    path = write_sweep(tmp_path / "s.yaml", mini, tmp_path / "out", {"loss.params.margin": [0.5]})
    _, _, runs = S.plan(path)
    Trainer(runs[0].cfg, progress=False).fit()
    _, _, changed = S.plan(path, ["train.epochs=2"])
    with pytest.raises(ConfigError, match=r"holds a run of another config \(it differs in train.epochs\)"):
        S.status(changed[0])


@pytest.mark.parametrize("grid, overrides, message", [
    ({}, (), "at least one key"),
    ({"loss.params.margin": []}, (), "grid key 'loss.params.margin' has no values"),
    ({"name": ["a", "b"]}, (), "'name' is set by the sweep"),
    ({"loss.params.margin": [0.5]}, ("loss.params.margin=0.6",), "loss.params.margin is swept by"),
    ({"train.epochs": [0]}, (), r"'train.epochs' = 0 \(set in .*grid point epochs=0\)"),
])
def test_bad_sweeps_say_what_to_fix(mini, tmp_path, grid, overrides, message):
    path = write_sweep(tmp_path / "s.yaml", mini, tmp_path / "out", grid)
    with pytest.raises(ConfigError, match=message):
        S.plan(path, overrides)


def test_a_missing_base_config(tmp_path):
    (tmp_path / "s.yaml").write_text("base: nowhere.yaml\ngrid: {seed: [1]}\n")
    with pytest.raises(ConfigError, match="base config 'nowhere.yaml' not found"):
        S.plan(tmp_path / "s.yaml")


def test_run_names():
    keys = ["acd.alpha", "loss.params.alpha", "acd.beta"]
    assert S.run_name({"acd.alpha": 3.0, "acd.beta": 0.5}, keys) == "acd.alpha=3.0_beta=0.5"
    # losses by their names; any other value still gives a folder name
    assert S.run_name({"loss": [{"name": "mqd", "weight": 4}, {"name": "attentive"}]}, ["loss"]) == "loss=mqd+attentive"
    assert S.run_name({"loss": {"name": "reid_supervised", "mode": "symmetric"}}, ["loss"]) == \
        "loss=reid_supervised-symmetric"
    listed = S.run_name({"train.reid.supervised": {"ce_weight": 0.5}}, ["train.reid.supervised"])
    assert listed.startswith("supervised=") and "0.5" in listed and not set(listed) & set("/ []{}\"'")
