"""The re-ID recipe in the trainer (D3still baselines, ACD co-training) on the tiny mini-veri.

Each step's loss is recomputed here from its definition (the network's own CE-LS + batch-hard triplet on
the P×K batch, plus the distillation loss on the distillation batch, plus L_ACD with the collaborative
logits), the frozen side is checked to stay bit-identical, and an interrupted ACD run resumes to the
same weights (RAHO's tiers come back from raho.json).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asymret.api.cli import main
from asymret.errors import ConfigError
from asymret.mini import ensure_mini
from asymret.retrieval.evaluate import evaluate_pair
from asymret.retrieval.pair import load_pair
from asymret.retrieval.records import load_image
from asymret.training.config import ExperimentConfig
from asymret.training.losses import LOSSES, LossBatch, create_loss
from asymret.training.reid import stack_by_shape
from asymret.training.trainer import Trainer, train
from tests.training.ddp import torchrun_train

DISTILLERS = ["fitnet", "cc", "csd", "raml", "rop", "d3still", "vanilla_kd", "pkt", "ugd", "mqd", "simdistill",
              "attentive"]


def net(backbone: str, size: int, **kw) -> dict:
    return {"backbone": backbone, "head": "bnneck", "num_classes": 4, "input": {"size": [size, size]}, **kw}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return ensure_mini(tmp_path_factory.mktemp("mini"), size="tiny")["veri"]


def base(root, out, **over) -> dict:
    cfg = {"seed": 1, "output_dir": str(out), "data": {"format": "veri776", "root": str(root), "num_workers": 0},
           "train": {"epochs": 1, "validate_every": 0,
                     "optim": {"optimizer": "sgd", "lr": 0.01, "weight_decay": 5e-4, "schedule": "constant"},
                     "reid": {"ids_per_batch": 2, "images_per_id": 2, "distill_batch_size": 6}}}
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def gallery(mini, tmp_path_factory):
    """A gallery network trained alone (its own loss only): the first step of every re-ID pipeline."""
    out = tmp_path_factory.mktemp("runs")
    cfg = base(mini, out, name="gallery", query_net=net("resnet10t", 48),
               loss={"name": "reid_supervised", "mode": "symmetric"})
    return train(ExperimentConfig.model_validate(cfg), progress=False)


def student(mini, out, gallery, loss="d3still", **over) -> dict:
    return base(mini, out, **{"name": f"q_{loss}", "query_net": net("resnet10t", 32),
                              "gallery_net": net("resnet10t", 48, weights=str(gallery / "query_net.pt")),
                              "loss": {"name": loss}, **over})


def state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gallery_trained_alone(gallery):
    pair = load_pair(gallery / "pair.pt")
    assert equal(pair.query_net.state_dict(), pair.gallery_net.state_dict())
    record = json.loads((gallery / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"own_ce", "own_triplet"} <= record.keys() and "distill" not in record


@pytest.mark.parametrize("loss", DISTILLERS)
def test_each_distiller_trains_the_query_network_against_the_frozen_gallery(mini, gallery, tmp_path, loss):
    # PKT's weight 30000 is D3still's for 256-image batches (its loss shrinks like 1/B); on these 6 it diverges
    params = {"weight": 30000.0 * 6 / 256} if loss == "pkt" else {}
    cfg = {**student(mini, tmp_path, gallery, loss), "loss": {"name": loss, "params": params}}
    run = train(ExperimentConfig.model_validate(cfg), progress=False)
    pair = load_pair(run / "pair.pt")
    assert equal(pair.gallery_net.state_dict(), state(gallery / "query_net.pt"))  # frozen: bit-identical
    record = json.loads((run / "metrics.jsonl").read_text())
    assert np.isfinite(record["loss"]) and record["distill"] > 0
    assert record["loss"] == pytest.approx(record["own_ce"] + record["own_triplet"] + record["distill"], rel=1e-5)


def test_frozen_gallery_step_equals_its_definition(mini, gallery, tmp_path):
    trainer = Trainer(ExperimentConfig.model_validate(student(mini, tmp_path, gallery, "raml")), progress=False)
    pk_loader, pk, d_loader, ds = trainer.recipe.loaders(0)
    torch.manual_seed(0)
    pk_images, pk_idx = next(iter(pk_loader)), next(iter(pk))
    d_images, d_idx = next(iter(d_loader)), next(iter(ds))
    assert len(pk_idx) == 4 and len(set(trainer.labels[pk_idx])) == 2 and len(d_idx) == 6
    trainer.recipe.train_mode()
    got = trainer.recipe.step(pk_images, pk_idx, d_images, d_idx).total

    q = trainer.query_net
    out = q.forward_train(stack_by_shape(pk_images))
    labels = torch.as_tensor(trainer.labels[pk_idx])
    own = F.cross_entropy(out.logits, labels, label_smoothing=0.1)
    dist = torch.cdist(out.pooled, out.pooled)
    same = labels[:, None] == labels[None]
    hardest_pos = torch.stack([dist[i][same[i] & (torch.arange(4) != i)].max() for i in range(4)])
    hardest_neg = torch.stack([dist[i][~same[i]].min() for i in range(4)])
    own = own + F.relu(hardest_pos - hardest_neg + 0.3).mean()
    qd = F.normalize(q.forward_train(stack_by_shape(d_images)).raw, dim=1)
    g_net = load_pair(gallery / "pair.pt").gallery_net
    with torch.no_grad():
        gd = torch.cat([g_net(g_net.transform(load_image(trainer.records[i]))[None]) for i in d_idx])
    off = ~torch.eye(6, dtype=torch.bool)
    s_qg, s_gg, s_qq = qd @ gd.T, gd @ gd.T, qd @ qd.T
    raml = ((1 - (qd * gd).sum(1)) ** 2).mean() + 0.7482 * ((s_qg - s_gg)[off] ** 2).mean() \
        + 0.6778 * ((s_qq - s_gg)[off] ** 2).mean()
    assert got.item() == pytest.approx((own + 10 * raml).item(), rel=1e-4)


def capture_batches(loss_fn, monkeypatch) -> list:
    """Record every LossBatch the loss receives (and still compute the loss)."""
    seen, forward = [], loss_fn.forward
    monkeypatch.setattr(loss_fn, "forward", lambda batch: (seen.append(batch), forward(batch))[1])
    return seen


def one_step(trainer):
    pk_loader, pk, d_loader, ds = trainer.recipe.loaders(0)
    torch.manual_seed(0)
    batches = next(iter(pk_loader)), next(iter(pk)), next(iter(d_loader)), next(iter(ds))
    trainer.recipe.train_mode()
    trainer.recipe.step(*batches)
    return batches[2], batches[3]


def resnet_stages(backbone, x) -> list:
    """A timm ResNet's four stage maps, its modules called one after another (no hooks)."""
    h = backbone.maxpool(backbone.act1(backbone.bn1(backbone.conv1(x))))
    stages = []
    for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        h = layer(h)
        stages.append(h)
    return stages


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("loss", ["fitnet", "cc", "csd", "raml", "rop", "d3still", "vanilla_kd", "pkt", "ugd", "mqd"])
def test_each_distiller_receives_the_tensors_the_d3still_code_feeds_it(mini, gallery, tmp_path, loss, monkeypatch):
    """One frozen-gallery step: the loss gets exactly its declared fields, equal to the two networks' own outputs
    on the distillation images: the query network's (with gradient) at query resolution, the frozen gallery
    network's (constants) at gallery resolution; raw BN-neck features, logits, stage maps, local features."""
    trainer = Trainer(ExperimentConfig.model_validate(student(mini, tmp_path, gallery, loss)), progress=False)
    seen = capture_batches(trainer.recipe.loss_fn, monkeypatch)
    d_images, d_idx = one_step(trainer)
    (got,) = seen
    needs = set(LOSSES[loss].needs)
    assert {f for f in vars(got) if getattr(got, f) is not None} == needs

    x = stack_by_shape(d_images)
    q_out = trainer.query_net.forward_train(x)  # train mode, as in the step: BN uses the batch's statistics
    g_net = load_pair(gallery / "pair.pt").gallery_net.eval()
    with torch.no_grad():
        hi = torch.stack([g_net.transform(load_image(trainer.records[i])) for i in d_idx])
        assert hi.shape[-1] == 48 and x.shape[-1] == 32
        g_out = g_net.forward_train(hi)
    expected = {"query": q_out.feature, "query_raw": q_out.raw, "query_logits": q_out.logits,
                "gallery": g_out.feature, "gallery_raw": g_out.raw, "gallery_logits": g_out.logits,
                "labels": torch.as_tensor(trainer.labels[d_idx])}
    for field in needs & expected.keys():
        close(getattr(got, field), expected[field])
        assert getattr(got, field).requires_grad == field.startswith("query")  # the frozen side is a constant
    if loss in ("fitnet", "pkt"):  # the raw features really are un-normalised (FitNet regresses them as they are)
        assert not torch.allclose(got.query_raw.norm(dim=1), torch.ones(len(d_idx)))
    if loss == "ugd":
        for got_stage, stage in zip(got.query_stages, resnet_stages(trainer.query_net.backbone, x), strict=True):
            close(got_stage, stage)
            assert got_stage.requires_grad
        with torch.no_grad():
            fmap = g_net.backbone.forward_features(hi)  # 2 × 2 at 48 px: its cells at P = 32 // 16 = 2 are itself
            assert fmap.shape[-2:] == (2, 2) and trainer.recipe.loss_fn.local_grids == (2, 1)
            b, c = fmap.shape[:2]
            cells = (fmap.flatten(2).transpose(1, 2).reshape(b * 4, c), fmap.mean((2, 3)))
            local = [g_net.head.neck(t).reshape(b, len(t) // b, -1) for t in cells]
        for got_local, got_logits, want in zip(got.gallery_local, got.gallery_local_logits, local, strict=True):
            close(got_local, want, rtol=2e-3, atol=2e-3)  # cached in float16
            close(got_logits, g_net.head.classifier(got_local))
            assert not got_local.requires_grad and not got_logits.requires_grad


@pytest.mark.parametrize("loss", ["fitnet", "ugd"])
def test_augmented_distillation_views_reach_the_distiller_from_a_live_frozen_gallery(mini, gallery, tmp_path, loss,
                                                                                      monkeypatch):
    """distill_augment: each view gets its own draw of the training augmentation (the D3still code's distillation
    loader); the frozen gallery then runs on its view in the step, and the loss sees exactly those outputs."""
    reid = {**base(mini, "")["train"]["reid"], "distill_augment": True}
    cfg = student(mini, tmp_path, gallery, loss, train={**base(mini, "")["train"], "reid": reid})
    trainer = Trainer(ExperimentConfig.model_validate(cfg), progress=False)
    assert trainer.gallery_emb is None and trainer.recipe.gallery_raw is None  # nothing read from the cache
    seen = capture_batches(trainer.recipe.loss_fn, monkeypatch)
    d_items, d_idx = one_step(trainer)
    (got,) = seen
    low, high = stack_by_shape([a for a, _ in d_items]), stack_by_shape([b for _, b in d_items])
    plain = torch.stack([trainer.gallery_net.transform(load_image(trainer.records[i])) for i in d_idx])
    assert high.shape == plain.shape and not torch.equal(high, plain)  # augmented, not the eval view
    close(got.query_raw, trainer.query_net.forward_train(low).raw)
    g_net = trainer.gallery_net
    with torch.no_grad():
        g_out = g_net.eval().forward_train(high)
    close(got.gallery_raw, g_out.raw)
    assert got.query_raw.requires_grad and not got.gallery_raw.requires_grad
    if loss == "ugd":
        with torch.no_grad():
            want = g_net.head.neck(g_out.fmap.flatten(2).transpose(1, 2).reshape(-1, g_out.fmap.shape[1]))
        close(got.gallery_local[0], want.reshape(len(d_idx), 4, -1))
        close(got.gallery_local_logits[0], g_net.head.classifier(got.gallery_local[0]))


def test_acd_base_loss_receives_the_frozen_query_and_the_trained_gallery(mini, d3still_run, tmp_path, monkeypatch):
    cfg = acd_config(mini, tmp_path, d3still_run, loss={"name": "fitnet"})
    trainer = Trainer(ExperimentConfig.model_validate(cfg), progress=False)
    seen = capture_batches(trainer.recipe.loss_fn, monkeypatch)
    pk_loader, pk, d_loader, ds = trainer.recipe.loaders(0)
    torch.manual_seed(0)
    d_items = next(iter(d_loader))
    trainer.recipe.train_mode()
    trainer.recipe.step(next(iter(pk_loader)), next(iter(pk)), d_items, next(iter(ds)))
    (got,) = seen
    assert {f for f in vars(got) if getattr(got, f) is not None} == {"query_raw", "gallery_raw"}
    with torch.no_grad():
        q_raw = trainer.query_net.forward_train(torch.stack([a for a, _ in d_items])).raw
    g_raw = trainer.gallery_net.forward_train(torch.stack([b for _, b in d_items])).raw
    close(got.query_raw, q_raw)
    close(got.gallery_raw, g_raw)
    assert not got.query_raw.requires_grad and got.gallery_raw.requires_grad  # ACD: the gallery side is trained


def test_ugd_in_a_loss_list_gets_its_local_features(mini, gallery, tmp_path):
    cfg = {**student(mini, tmp_path, gallery, "ugd"), "loss": [{"name": "ugd", "weight": 0.5}, {"name": "fitnet"}]}
    trainer = Trainer(ExperimentConfig.model_validate(cfg), progress=False)
    assert trainer.recipe._local_grids() == (2, 1) and len(trainer.recipe.gallery_local) == 2
    pk_loader, pk, d_loader, ds = trainer.recipe.loaders(0)
    trainer.recipe.train_mode()
    out = trainer.recipe.step(next(iter(pk_loader)), next(iter(pk)), next(iter(d_loader)), next(iter(ds)))
    assert torch.isfinite(out.total) and out.parts["distill_ugd"] > 0 and out.parts["distill_fitnet"] > 0


def test_local_feature_losses_need_a_frozen_gallery(mini, d3still_run, tmp_path):
    with pytest.raises(ConfigError, match="gallery_frozen: true"):
        Trainer(ExperimentConfig.model_validate(acd_config(mini, tmp_path, d3still_run, loss={"name": "ugd"})),
                progress=False)


@pytest.fixture(scope="module")
def d3still_run(mini, gallery, tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    return train(ExperimentConfig.model_validate(student(mini, out, gallery)), progress=False)


def acd_config(mini, out, student_run, **over) -> dict:
    return base(mini, out, name="acd", gallery_frozen=False, acd={"pair": str(student_run / "pair.pt"), "raho_batches": 2},
                **{"loss": {"name": "d3still"}, **over})


def test_acd_step_equals_its_definition(mini, d3still_run, tmp_path):
    trainer = Trainer(ExperimentConfig.model_validate(acd_config(mini, tmp_path, d3still_run)), progress=False)
    assert trainer.trained == "gallery_net" and (tmp_path / "acd" / "raho.json").is_file()
    pk_loader, pk, d_loader, ds = trainer.recipe.loaders(0)
    torch.manual_seed(0)
    pk_images, pk_idx = next(iter(pk_loader)), next(iter(pk))
    d_items, d_idx = next(iter(d_loader)), next(iter(ds))
    assert pk_images[0].shape[-1] == 48 and d_items[0][0].shape[-1] == 32 and d_items[0][1].shape[-1] == 48
    trainer.recipe.train_mode()
    got = trainer.recipe.step(pk_images, pk_idx, d_items, d_idx).total

    g, q = trainer.gallery_net, trainer.query_net
    sup = create_loss("reid_supervised")

    out = g.forward_train(stack_by_shape(pk_images))
    own = sup(LossBatch(query=out.pooled, query_logits=out.logits, labels=torch.as_tensor(trainer.labels[pk_idx])))
    with torch.no_grad():
        qo = q.eval().forward_train(torch.stack([a for a, _ in d_items]))
    go = g.forward_train(torch.stack([b for _, b in d_items]))
    base_loss = create_loss("d3still")(LossBatch(query_raw=qo.raw, gallery_raw=go.raw)).total
    tau = 2.0

    def kl(target, logits, t):  # KL(σ(logits/t) ‖ σ(target/t)) written out, batch mean
        p = torch.softmax(logits / t, 1)
        return (p * (torch.log_softmax(logits / t, 1) - torch.log_softmax(target / t, 1))).sum(1).mean()

    z_c = g.head.classifier((go.raw + qo.raw) / 2)
    acd = 3 * tau**2 * kl(qo.logits, go.logits, tau) + 2 * (tau / 2) ** 2 * kl(qo.logits, z_c, tau / 2)
    assert got.item() == pytest.approx((own.total + base_loss + acd).item(), rel=1e-4)


def test_acd_cotrains_the_gallery_and_keeps_the_query_network(mini, d3still_run, tmp_path):
    run = train(ExperimentConfig.model_validate(acd_config(mini, tmp_path, d3still_run)), progress=False)
    before, after = load_pair(d3still_run / "pair.pt"), load_pair(run / "pair.pt")
    assert equal(after.query_net.state_dict(), before.query_net.state_dict())
    assert not equal(after.gallery_net.state_dict(), before.gallery_net.state_dict())
    assert after.co_trained and equal(after.reference_gallery.state_dict(), before.gallery_net.state_dict())
    assert equal(state(run / "gallery_net.pt"), after.gallery_net.state_dict())
    report = json.loads((run / "raho.json").read_text())
    assert len(report["blocks"]) == 4 and report["cross_resolution"]
    tiers = {b["tier"] for b in report["blocks"]}
    assert tiers <= {"eta", "gamma*eta", "gamma^2*eta"} and "gamma^2*eta" in tiers
    assert len(report["U_hr"]) == 1  # int(0.3 · 4)

    rows = evaluate_pair(after.query_net, after.gallery_net, "mini-veri", mini, reference_gallery=after.reference_gallery,
                         rows=("gallery", "sir", "asymmetric"))
    original = evaluate_pair(before.query_net, before.gallery_net, "mini-veri", mini, rows=("gallery",))
    cotrained = evaluate_pair(after.query_net, after.gallery_net, "mini-veri", mini, rows=("gallery",))
    assert rows["gallery"] == original["gallery"] and rows["sir"] == cotrained["gallery"]


def test_acd_resume_repeats_the_uninterrupted_run(mini, d3still_run, tmp_path):
    two_epochs = {**base(mini, "")["train"], "epochs": 2}
    whole = train(ExperimentConfig.model_validate(acd_config(mini, tmp_path / "whole", d3still_run, train=two_epochs)),
                  progress=False)
    first = acd_config(mini, tmp_path / "parts", d3still_run)
    train(ExperimentConfig.model_validate(first), progress=False)
    second = dict(first, train={**first["train"], "epochs": 2})
    parts = train(ExperimentConfig.model_validate(second), resume=True, progress=False)
    assert equal(state(whole / "gallery_net.pt"), state(parts / "gallery_net.pt"))


def test_evaluate_cli_adds_the_sir_row_for_cotrained_galleries(mini, d3still_run, tmp_path, capsys):
    run = train(ExperimentConfig.model_validate(acd_config(mini, tmp_path, d3still_run)), progress=False)
    assert main(["evaluate", "--pair", str(run / "pair.pt"), "--benchmark", "mini-veri", "--root", str(mini),
                 "--workers", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["gallery", "symmetric", "asymmetric", "sir", "cost", "dataset", "precision"]
    assert set(result["sir"]) >= {"mAP", "mAP_official", "R1", "mINP"}
    assert set(result["cost"]) == {"query_net", "gallery_net"}  # the row's query side pays its query_net's cost
    assert main(["evaluate", "--pair", str(d3still_run / "pair.pt"), "--benchmark", "mini-veri", "--root",
                 str(mini), "--workers", "0", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["gallery", "symmetric", "asymmetric", "cost", "dataset",
                                                         "precision"]


def test_reid_config_errors(mini, gallery, tmp_path):
    no_head = student(mini, tmp_path, gallery, query_net={"backbone": "resnet18", "input": {"size": [32, 32]}})
    with pytest.raises(ConfigError, match="num_classes: 4"):
        Trainer(ExperimentConfig.model_validate(no_head), progress=False)
    wrong = student(mini, tmp_path, gallery, query_net={**net("resnet10t", 32), "num_classes": 7})
    with pytest.raises(ConfigError, match="has 4 identities"):
        Trainer(ExperimentConfig.model_validate(wrong), progress=False)
    with pytest.raises(ConfigError, match="reid_supervised"):
        Trainer(ExperimentConfig.model_validate(student(mini, tmp_path, gallery, "ce_ls")), progress=False)
    with pytest.raises(Exception, match="symmetric"):
        ExperimentConfig.model_validate({**student(mini, tmp_path, gallery), "gallery_frozen": False,
                                         "loss": {"name": "d3still", "mode": "symmetric"}})
    longer_side = student(mini, tmp_path, gallery, query_net={**net("resnet10t", 32), "input": {"size": 40}})
    with pytest.raises(ConfigError, match=r"input.size: \[height, width\]"):
        train(ExperimentConfig.model_validate(longer_side), progress=False)


@pytest.mark.slow
def test_two_process_gloo_equals_one_process_accumulating_two_steps(mini, gallery, tmp_path):
    """Rank r takes P×K and distillation batches r, r + 2, ...; the averaged gradients equal one process
    accumulating the same two batches per optimiser step (augmentation off: its draws differ per process)."""
    # 2 x 3 gives 4 P×K batches per epoch on the tiny set: an even count, so no rank drops a last batch
    no_augment = {"ids_per_batch": 2, "images_per_id": 3, "distill_batch_size": 4, "flip": False, "pad": 0,
                  "erasing": 0.0}
    train_cfg = {**base(mini, "")["train"], "epochs": 2, "reid": no_augment}
    single = student(mini, tmp_path / "single", gallery, "rop", train={**train_cfg, "accumulate": 2})
    one = Trainer(ExperimentConfig.model_validate(single), progress=False)
    assert len(one.recipe.loaders(0)[1]) % 2 == 0 and len(one.recipe.loaders(1)[1]) % 2 == 0
    one.fit()
    torchrun_train(student(mini, tmp_path / "ddp", gallery, "rop", train=train_cfg), tmp_path / "ddp.yaml")
    a, b = state(tmp_path / "single" / "q_rop" / "query_net.pt"), state(tmp_path / "ddp" / "q_rop" / "query_net.pt")
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=0) for k in a)


def test_raho_tiers_are_reused_only_for_the_same_starting_weights(mini, d3still_run, tmp_path):
    stale = {"measured_on": {"gallery_net": "another gallery"}, "gamma": 0.05,
             "blocks": [{"name": "layer1.0", "tier": "eta"}]}
    (tmp_path / "acd").mkdir()
    (tmp_path / "acd" / "raho.json").write_text(json.dumps(stale))
    Trainer(ExperimentConfig.model_validate(acd_config(mini, tmp_path, d3still_run)), progress=False)
    fresh = json.loads((tmp_path / "acd" / "raho.json").read_text())
    assert len(fresh["blocks"]) == 4 and fresh["measured_on"]["gallery_net"] != "another gallery"
    before = (tmp_path / "acd" / "raho.json").stat().st_mtime_ns
    Trainer(ExperimentConfig.model_validate(acd_config(mini, tmp_path, d3still_run)), progress=False)
    assert (tmp_path / "acd" / "raho.json").stat().st_mtime_ns == before  # same start: read back, not re-measured
