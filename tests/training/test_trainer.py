"""The trainer: exact resume after a kill, a clear stop on NaN, data parallel on CPU (gloo)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from asymret.api.cli import main
from asymret.errors import ConfigError, TrainingError
from asymret.retrieval.pair import load_pair
from asymret.training.config import ExperimentConfig
from asymret.training.trainer import Trainer, train
from tests.training.ddp import torchrun_train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Six classes of four noisy views of a random 8x8 colour pattern."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in range(6):
        base = rng.integers(0, 255, (8, 8, 3))
        for i in range(4):
            img = np.kron(base, np.ones((4, 4, 1))) + rng.normal(0, 20, (32, 32, 3))
            (root / f"class{c}").mkdir(exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"class{c}" / f"{i}.jpg")
    return root


def config(folder: Path, out: Path, **over) -> dict:
    cfg = {
        "name": "run", "seed": 3, "output_dir": str(out),
        "query_net": {"backbone": "mobilenetv2_035", "dim": 32, "input": {"size": 32}},
        "gallery_net": {"backbone": "resnet18", "dim": 32, "input": {"size": 32}},
        "data": {"format": "folder", "root": str(folder), "num_workers": 0},
        "loss": {"name": "contr_plus"},
        "train": {"epochs": 3, "batch_size": 2, "optim": {"lr": 1e-3},
                  "mining": {"tuples_per_epoch": 8, "num_negatives": 2, "pool_size": 16}},
    }
    for key, value in over.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return cfg


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def same(a: dict, b: dict, atol=0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0) for k in a)


def test_run_folder_and_pair(folder, tmp_path):
    run = train(ExperimentConfig.model_validate(config(folder, tmp_path, **{"train.epochs": 2})), progress=False)
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoints", "pair.pt", "query_net.pt"}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] and all(np.isfinite(x["loss"]) for x in lines)
    assert lines[1]["lr"] == pytest.approx(1e-3 * 0.99004983 ** 2)  # AML's exponential decay per epoch
    pair = load_pair(run / "pair.pt")
    assert pair.query_net.spec.backbone == "mobilenetv2_035" and pair.gallery_net.spec.backbone == "resnet18"
    assert same(pair.query_net.state_dict(), weights(run / "query_net.pt"))
    # the gallery embeddings were cached once and are reused by the next run
    entries = list((tmp_path / ".cache").iterdir())
    assert len(entries) == 1
    train(ExperimentConfig.model_validate(config(folder, tmp_path, name="again", **{"train.epochs": 1})),
          progress=False)
    assert list((tmp_path / ".cache").iterdir()) == entries


def test_a_gallery_weights_file_with_whitening_puts_it_into_the_pair(folder, tmp_path):
    """``asymret weights convert`` output (a converted cirtorch teacher) carries its learned whitening; the pair
    of a query network trained against it holds that whitening, which evaluate and serve apply to both sides."""
    from asymret.retrieval.encoders import create_encoder, encoder_checkpoint
    from asymret.retrieval.whitening import Whitening

    spec = config(folder, tmp_path)["gallery_net"]
    rng = np.random.default_rng(0)
    white = Whitening(rng.standard_normal(32), rng.standard_normal((32, 32)))
    torch.save({**encoder_checkpoint(create_encoder(spec)), "whitening": white.state_dict()}, tmp_path / "teacher.pt")
    over = {"gallery_net.weights": str(tmp_path / "teacher.pt"), "train.epochs": 1}
    pair = load_pair(train(ExperimentConfig.model_validate(config(folder, tmp_path, **over)), progress=False)
                     / "pair.pt")
    assert pair.whitening is not None and pair.whitening.kind == "learned"
    x = torch.randn(3, 32)
    torch.testing.assert_close(pair.whitening(x), white(x))
    alone = config(folder, tmp_path, name="alone", **{"query_net": dict(spec), "query_net.weights": str(tmp_path / "teacher.pt"),
                                                      "loss.mode": "symmetric", "loss.name": "contrastive",
                                                      "train.epochs": 1})
    # a network trained here has left the weights its whitening was learned for: no whitening in its pair
    assert load_pair(train(ExperimentConfig.model_validate(alone), progress=False) / "pair.pt").whitening is None


def test_whitening_learn_stores_each_networks_lw_learned_on_the_training_pairs(folder, tmp_path):
    """whitening.learn: the query and gallery networks each get cirtorch's Lw of their own embeddings of the same
    same-label pairs (one per image, the positive another image of its class); a weights file's whitening is kept
    unless keep_checkpoint is false; a symmetric run learns one whitening for its one network."""
    from asymret.retrieval.datasets import LabelledFolder
    from asymret.retrieval.encode import encode_records
    from asymret.retrieval.encoders import create_encoder, encoder_checkpoint
    from asymret.retrieval.whitening import Whitening
    from asymret.training.whiten import whitening_pairs
    from tests.retrieval.test_whitening import cirtorch_apply, cirtorch_lw

    over = {"train.epochs": 1, "whitening": {"learn": True}}
    pair = load_pair(train(ExperimentConfig.model_validate(config(folder, tmp_path, **over)), progress=False)
                     / "pair.pt")
    assert pair.whitening is not None and pair.query_whitening is not None
    data = LabelledFolder(folder)
    q, p, source = whitening_pairs(data, "auto", None, seed=3)
    assert source == "labels" and sorted(q) == list(range(24)) and all(data.labels[q] == data.labels[p]) \
        and all(q != p)
    for white, net in ((pair.whitening, pair.gallery_net), (pair.query_whitening, pair.query_net)):
        X = encode_records(net, data.records, num_workers=0, progress=False)
        m, P = cirtorch_lw(X, q, p)
        ours, ref = white(X), cirtorch_apply(X, m, P)
        np.testing.assert_allclose(ours @ ours.T, ref @ ref.T, atol=2e-3)
        assert white.info["pairs"] == 24 and white.info["pair_source"] == "labels" and white.kind == "learned"

    def exported(name, **more):  # the pair an untrained run of this config exports (no epochs: export only)
        trainer = Trainer(ExperimentConfig.model_validate(config(folder, tmp_path, name=name, **more)))
        trainer.run_dir.mkdir(parents=True)
        return load_pair(trainer.export())

    spec = config(folder, tmp_path)["gallery_net"]
    cirtorch_like = Whitening(np.zeros(32), np.eye(32)[::-1])
    torch.save({**encoder_checkpoint(create_encoder(spec)), "whitening": cirtorch_like.state_dict()},
               tmp_path / "teacher.pt")
    teacher = {"gallery_net.weights": str(tmp_path / "teacher.pt")}
    kept = exported("kept", **over, **teacher)
    assert torch.equal(kept.whitening.P, cirtorch_like.P) and "teacher.pt" in kept.whitening.info["learned_on"]
    assert kept.query_whitening is not None
    relearned = exported("relearned", **teacher, whitening={"learn": True, "keep_checkpoint": False, "dim": 8})
    assert relearned.whitening.dim == 8 and relearned.whitening.info["pairs"] == 24
    sym = exported("alone", **over, **{"loss.mode": "symmetric", "loss.name": "contrastive"})
    assert torch.equal(sym.whitening.P, sym.query_whitening.P)  # one network, one whitening


def test_spec_whitening_fields_are_refused_in_a_config(folder, tmp_path):
    with pytest.raises(ValueError, match="whitening.learn: true"):
        ExperimentConfig.model_validate(config(folder, tmp_path, **{"query_net.whitening": "learned"}))


def test_killed_run_resumes_to_the_same_weights(folder, tmp_path):
    full = train(ExperimentConfig.model_validate(config(folder, tmp_path / "a")), progress=False)
    cfg_path = tmp_path / "b.yaml"
    cfg_path.write_text(yaml.safe_dump(config(folder, tmp_path / "b")))
    proc = subprocess.Popen([sys.executable, "-m", "asymret", "train", str(cfg_path), "--no-progress"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "b" / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # somewhere in epoch 2 (or later): resume must not care
    proc.wait()
    assert main(["train", str(cfg_path), "--resume", "--no-progress"]) == 0
    resumed = tmp_path / "b" / "run"
    assert same(weights(full / "query_net.pt"), weights(resumed / "query_net.pt"))
    epochs = [json.loads(x)["epoch"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-1] == 3


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(folder, tmp_path):
    cfg = config(folder, tmp_path, **{"train.optim": {"optimizer": "sgd", "lr": 1e12}, "train.epochs": 4})
    with pytest.raises(TrainingError, match="lower train.optim.lr"):
        train(ExperimentConfig.model_validate(cfg), progress=False)


@pytest.mark.parametrize("loss, mode", [("contrastive", "asymmetric"), ("contr_plus", "asymmetric"),
                                        ("contrastive", "symmetric")])
def test_tuples_without_negatives_train(folder, tmp_path, loss, mode):
    """AML Tables 5/6, rows "Pos" and "SELF + Pos": no negatives are mined and the loss is the positives' part."""
    cfg = ExperimentConfig.model_validate(config(folder, tmp_path, loss={"name": loss, "mode": mode},
                                                 **{"train.mining": {"tuples_per_epoch": 4, "num_negatives": 0},
                                                    "train.epochs": 1}))
    trainer = Trainer(cfg, progress=False)
    assert trainer.recipe.make_tuples(np.random.default_rng(0)).negatives.shape == (4, 0)
    trainer.fit()
    record = json.loads((trainer.run_dir / "metrics.jsonl").read_text())
    assert "d_neg" not in record and np.isfinite(record["loss"]) and record["loss"] > 0
    assert ("d_self" in record) == (loss == "contr_plus")
    # with no negatives contrastive is ½ d² over the positives (and SELF): at least ½ mean(d)² by Jensen
    assert record["loss"] >= 0.5 * record["d_pos"] ** 2 - 1e-6


def test_config_errors(folder, tmp_path):
    with pytest.raises(ConfigError, match="unknown loss 'contrplus'"):
        Trainer(ExperimentConfig.model_validate(config(folder, tmp_path, **{"loss.name": "contrplus"})))
    with pytest.raises(ConfigError, match="set query_net.dim: 32"):
        Trainer(ExperimentConfig.model_validate(config(folder, tmp_path, **{"query_net.dim": 16})))
    with pytest.raises(ConfigError, match="no symmetric mode"):
        Trainer(ExperimentConfig.model_validate(config(folder, tmp_path, loss={"name": "rkd", "mode": "symmetric"})))


@pytest.mark.slow
def test_two_process_gloo_equals_one_process_with_the_global_batch(folder, tmp_path):
    """Each rank takes every other tuple; averaged gradients equal one process on both halves.

    SGD, because Adam turns float-rounding noise on near-zero gradients into full lr-sized steps.
    """
    sgd = {"optimizer": "sgd", "lr": 0.05}
    single = config(folder, tmp_path / "single", **{"train.batch_size": 4, "train.epochs": 2, "train.optim": sgd})
    train(ExperimentConfig.model_validate(single), progress=False)
    ddp = config(folder, tmp_path / "ddp", **{"train.batch_size": 2, "train.epochs": 2, "train.optim": sgd})
    torchrun_train(ddp, tmp_path / "ddp.yaml")
    assert same(weights(tmp_path / "single" / "run" / "query_net.pt"),
                weights(tmp_path / "ddp" / "run" / "query_net.pt"), atol=1e-5)


def test_accumulated_steps_sum_the_aml_tuple_losses_like_one_larger_step(folder, tmp_path):
    """AML sums over a step's tuples (its code accumulates one backward per tuple), so 2 accumulated steps of
    2 tuples give the gradient of one step of 4: the same weights after training (SGD, as above)."""
    sgd = {"optimizer": "sgd", "lr": 0.05}
    one = config(folder, tmp_path / "one", **{"train.batch_size": 4, "train.epochs": 1, "train.optim": sgd})
    train(ExperimentConfig.model_validate(one), progress=False)
    acc = config(folder, tmp_path / "acc", **{"train.batch_size": 2, "train.accumulate": 2, "train.epochs": 1,
                                              "train.optim": sgd})
    train(ExperimentConfig.model_validate(acc), progress=False)
    assert same(weights(tmp_path / "one" / "run" / "query_net.pt"),
                weights(tmp_path / "acc" / "run" / "query_net.pt"), atol=1e-5)
