"""Several losses in one run (``loss: [{name, weight, params}, ...]``): the combined loss is the weighted sum of
the separate losses (each recomputed here from its equation), its parts are logged apart, and the configs that
cannot work are refused with the fix.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asymret.config import dump_config, load_config
from asymret.errors import ConfigError
from asymret.mini import ensure_mini
from asymret.training.config import ExperimentConfig, LossConfig
from asymret.training.losses import CombinedLoss, LossBatch, build_loss, combined_needs, create_loss
from asymret.training.tensorboard import scalars
from asymret.training.trainer import Trainer, train


def mqd_by_hand(q, g, tau=0.1, t=2.0):
    """3DG-STFM Eq. (4)-(5) on global descriptors: KL(gallery ‖ query) of every row and every column of the
    similarity matrices at dual-softmax temperature τ and KD temperature T, times T², mean over the 2B."""
    q, g = F.normalize(q, dim=1), F.normalize(g, dim=1)
    lq, lg = q @ g.T / tau / t, g @ g.T / tau / t
    b = len(q)
    rows = F.kl_div(F.log_softmax(lq, 1), F.softmax(lg, 1), reduction="sum") / b
    cols = F.kl_div(F.log_softmax(lq, 0), F.softmax(lg, 0), reduction="sum") / b
    return t * t * (rows + cols) / 2


def attentive_by_hand(q, g, var, eps=1e-3):
    """3DG-STFM Eq. (7): mean_i ‖q_i − g_i‖² / (2 σ²_i), σ² floored at eps."""
    return torch.stack([(q[i] - g[i]).pow(2).sum() / (2 * max(float(var[i]), eps)) for i in range(len(q))]).mean()


@pytest.fixture
def batch():
    torch.manual_seed(0)
    q, g = torch.randn(6, 8), torch.randn(6, 8)
    return LossBatch(query=F.normalize(q, dim=1), gallery=F.normalize(g, dim=1), uncertainty=torch.rand(6) + 0.05)


def test_combined_loss_is_the_weighted_sum_of_the_separate_losses(batch):
    loss = build_loss([("mqd", 4.0, {}), ("attentive", 1.0, {"weight": 0.5})])
    out = loss(batch)
    mqd = mqd_by_hand(batch.query, batch.gallery)
    att = 0.5 * attentive_by_hand(batch.query, batch.gallery, batch.uncertainty)  # its own weight param
    assert out.total.item() == pytest.approx((4 * mqd + att).item(), rel=1e-5)
    assert set(out.parts) == {"mqd", "mqd/mqd", "attentive", "attentive/attentive"}
    assert out.parts["mqd"].item() == pytest.approx(4 * mqd.item(), rel=1e-5)
    assert out.parts["mqd/mqd"].item() == pytest.approx(mqd.item(), rel=1e-5)
    assert out.parts["attentive"].item() == pytest.approx(att.item(), rel=1e-5)
    assert out.parts["attentive/attentive"].item() == pytest.approx(2 * att.item(), rel=1e-5)  # unweighted part
    assert (out.parts["mqd"] + out.parts["attentive"]).item() == pytest.approx(out.total.item(), rel=1e-6)
    assert loss.needs == ("query", "gallery", "uncertainty") == combined_needs(["mqd", "attentive"])


def test_combined_gradient_is_the_weighted_sum_of_the_separate_gradients(batch):
    query = batch.query.clone().requires_grad_(True)
    b = LossBatch(query=query, gallery=batch.gallery, uncertainty=batch.uncertainty)
    build_loss([("mqd", 4.0, {}), ("attentive", 0.25, {})])(b).total.backward()
    combined = query.grad.clone()
    query.grad = None
    (4 * mqd_by_hand(query, batch.gallery) + 0.25 * attentive_by_hand(query, batch.gallery, batch.uncertainty)).backward()
    assert torch.allclose(combined, query.grad, atol=1e-6)


def test_tuple_losses_combine_too():
    torch.manual_seed(1)
    q, g = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    pos, neg = F.normalize(torch.randn(3, 1, 4), dim=2), F.normalize(torch.randn(3, 2, 4), dim=2)
    out = build_loss([("contrastive", 1.0, {"margin": 0.7}), ("regression", 0.5, {})])(
        LossBatch(query=q, gallery=g, positive=pos, negative=neg))
    eps = 1e-6  # AML's: d = ‖q − x + ε‖, and both losses sum over the tuples (docs/training.md)
    d_p, d_n = (q[:, None] - pos + eps).norm(dim=2), (q[:, None] - neg + eps).norm(dim=2)
    contrastive = (0.5 * d_p.pow(2).sum(1) + 0.5 * (0.7 - d_n).clamp_min(0).pow(2).sum(1)).sum()
    regression = 0.5 * (q - g + eps).pow(2).sum()
    assert out.total.item() == pytest.approx((contrastive + 0.5 * regression).item(), rel=1e-5)


def test_a_single_loss_of_weight_one_is_that_loss_itself():
    assert type(build_loss([("mqd", 1.0, {})])) is type(create_loss("mqd"))
    assert isinstance(build_loss([("mqd", 2.0, {})]), CombinedLoss)


def test_combined_loss_errors():
    with pytest.raises(ConfigError, match="unknown loss 'mqdd'"):
        CombinedLoss([("mqd", 1.0, {}), ("mqdd", 1.0, {})])
    with pytest.raises(ConfigError, match="'mqd' more than once"):
        CombinedLoss([("mqd", 1.0, {}), ("mqd", 2.0, {})])
    with pytest.raises(ConfigError, match="loss 'attentive' has no parameter 'margin'"):
        CombinedLoss([("mqd", 1.0, {}), ("attentive", 1.0, {"margin": 1})])
    with pytest.raises(ConfigError, match=r"mixes losses summed over the batch's tuples \(contr_plus\)"):
        CombinedLoss([("contr_plus", 1.0, {}), ("rkd", 1.0, {})])
    assert CombinedLoss([("contr_plus", 1.0, {}), ("regression", 0.5, {})]).batch_reduction == "sum"
    assert CombinedLoss([("mqd", 1.0, {}), ("attentive", 0.5, {})]).batch_reduction == "mean"


# ---- the config ----------------------------------------------------------------------------------------------

def test_the_list_form_and_the_mapping_form(tmp_path):
    listed = LossConfig.model_validate([{"name": "mqd", "weight": 4}, {"name": "attentive", "params": {"eps": 0.01}}])
    assert listed.name == "mqd+attentive" and listed.names == ["mqd", "attentive"]
    assert listed.specs() == [("mqd", 4.0, {}), ("attentive", 1.0, {"eps": 0.01})]
    mapping = LossConfig.model_validate({"terms": [{"name": "mqd", "weight": 4}], "mode": "asymmetric"})
    assert mapping.name == "mqd" and mapping.specs() == [("mqd", 4.0, {})]
    single = LossConfig.model_validate({"name": "contr_plus", "params": {"margin": 0.8}})
    assert single.specs() == [("contr_plus", 1.0, {"margin": 0.8})] and single.terms == []
    # the resolved config a run folder keeps validates again to the same config
    path = tmp_path / "exp.yaml"
    path.write_text("name: x\nloss: [{name: mqd, weight: 4}, {name: attentive}]\n")
    cfg = load_config(path, model=ExperimentConfig)
    (tmp_path / "again.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "again.yaml", model=ExperimentConfig) == cfg
    # overrides index the list
    cfg = load_config(path, ["loss.1.weight=0.25", "loss.0.params.focal=true"], model=ExperimentConfig)
    assert cfg.loss.specs() == [("mqd", 4.0, {"focal": True}), ("attentive", 0.25, {})]


@pytest.mark.parametrize("loss, message", [
    ([], "an empty list names no loss"),
    ([{"name": "mqd"}, {"name": "mqd", "weight": 2}], "'mqd' more than once"),
    ({"name": "fitnet", "terms": [{"name": "mqd"}]}, "loss.name is set by a list of losses"),
    ({"terms": [{"name": "mqd"}], "params": {"weight": 2}}, "give params inside each one"),
    ([{"name": "mqd", "weight": -1}], "greater than or equal to 0"),
    ([{"name": "mqd", "wieght": 1}], "unknown key 'loss.terms.0.wieght'"),
])
def test_bad_loss_lists_say_what_to_fix(tmp_path, loss, message):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"name": "x", "loss": loss}))
    with pytest.raises(ConfigError, match=message):
        load_config(path, model=ExperimentConfig)


# ---- runs --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return ensure_mini(tmp_path_factory.mktemp("mini"), size="tiny")


@pytest.fixture(scope="module")
def veri(mini):
    return mini["veri"]


def net(backbone: str, size: int, **kw) -> dict:
    return {"backbone": backbone, "head": "bnneck", "num_classes": 4, "input": {"size": [size, size]}, **kw}


def reid(root, out, **over) -> dict:
    cfg = {"seed": 1, "output_dir": str(out), "data": {"format": "veri776", "root": str(root), "num_workers": 0},
           "train": {"epochs": 1, "validate_every": 0,
                     "optim": {"optimizer": "sgd", "lr": 0.01, "weight_decay": 5e-4, "schedule": "constant"},
                     "reid": {"ids_per_batch": 2, "images_per_id": 2, "distill_batch_size": 6}}}
    return {**cfg, **over}


@pytest.fixture(scope="module")
def gallery(veri, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = reid(veri, out, name="gallery", query_net=net("resnet10t", 48),
               loss={"name": "reid_supervised", "mode": "symmetric"})
    return train(ExperimentConfig.model_validate(cfg), progress=False)


def student(veri, out, gallery, loss, **over) -> ExperimentConfig:
    return ExperimentConfig.model_validate(reid(veri, out, name="combined", query_net=net("resnet10t", 32),
                                                gallery_net=net("resnet10t", 48, weights=str(gallery / "query_net.pt")),
                                                loss=loss, **over))


def test_mqd_plus_attentive_trains_and_logs_its_parts_apart(veri, gallery, tmp_path):
    """Seed 002 Table 4's "MQD + attentive" row in the re-ID recipe: one epoch of a few steps on tiny data."""
    cfg = student(veri, tmp_path, gallery, [{"name": "mqd", "weight": 4}, {"name": "attentive", "weight": 1}])
    run = train(cfg, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    for r in records:
        assert {"distill_mqd", "distill_mqd/mqd", "distill_attentive", "distill_attentive/attentive"} <= r.keys()
        assert all(np.isfinite(v) and v > 0 for k, v in r.items() if k.startswith("distill"))
        assert r["distill_mqd"] == pytest.approx(4 * r["distill_mqd/mqd"], rel=1e-5)
        assert r["distill"] == pytest.approx(r["distill_mqd"] + r["distill_attentive"], rel=1e-5)
        assert r["loss"] == pytest.approx(r["own_ce"] + r["own_triplet"] + r["distill"], rel=1e-5)
    tags = scalars(records[-1])  # the TensorBoard tags the trainer writes beside metrics.jsonl
    assert {"train/distill_mqd/mqd", "train/distill_attentive/attentive"} <= tags.keys()
    assert load_config(run / "config.yaml", model=ExperimentConfig).loss.names == ["mqd", "attentive"]


def test_combined_step_equals_the_separate_losses_on_the_same_batch(veri, gallery, tmp_path):
    trainer = Trainer(student(veri, tmp_path, gallery, [{"name": "mqd", "weight": 4}, {"name": "attentive"}]),
                      progress=False)
    assert trainer.recipe.uncertainty is not None  # the attentive term's need reached the recipe
    pk_loader, pk, d_loader, ds = trainer.recipe.loaders(0)
    pk_images, pk_idx, d_images, d_idx = next(iter(pk_loader)), next(iter(pk)), next(iter(d_loader)), next(iter(ds))
    trainer.recipe.train_mode()
    torch.manual_seed(0)
    out = trainer.recipe.step(pk_images, pk_idx, d_images, d_idx)
    q = trainer.query_net.forward_train(torch.stack(d_images)).feature
    g = trainer.gallery_emb[torch.as_tensor(d_idx)]
    expected = 4 * mqd_by_hand(q, g) + attentive_by_hand(q, g, trainer.recipe.uncertainty[torch.as_tensor(d_idx)])
    assert out.parts["distill"].item() == pytest.approx(expected.item(), rel=1e-4)


def aml_config(mini, out, loss) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "name": "aml_combined", "output_dir": str(out),
        "query_net": {"backbone": "mobilenetv2_035", "dim": 16, "input": {"size": 32}},
        "gallery_net": {"backbone": "resnet10t", "dim": 16, "input": {"size": 32}},
        "data": {"format": "sfm120k", "pkl": str(mini["train_pkl"]), "root": str(mini["train_images"]), "num_workers": 0},
        "loss": loss,
        "train": {"epochs": 1, "batch_size": 2, "validate_every": 0,
                  "mining": {"tuples_per_epoch": 4, "num_negatives": 2, "pool_size": 8}}})


def test_the_aml_recipe_trains_combined_tuple_losses(mini, tmp_path):
    cfg = aml_config(mini, tmp_path, [{"name": "contr_plus"}, {"name": "regression", "weight": 0.5}])
    record = json.loads((train(cfg, progress=False) / "metrics.jsonl").read_text())
    assert {"contr_plus", "contr_plus/d_self", "contr_plus/d_neg", "regression", "regression/d_self"} <= record.keys()
    assert record["loss"] == pytest.approx(record["contr_plus"] + record["regression"], rel=1e-5)


def test_combinations_the_recipes_cannot_run_are_refused(veri, gallery, tmp_path):
    with pytest.raises(ConfigError, match="AML tuple losses train in the AML recipe"):
        Trainer(student(veri, tmp_path, gallery, [{"name": "mqd"}, {"name": "contrastive"}]), progress=False)
    with pytest.raises(ConfigError, match="remove 'reid_supervised' from the loss list"):
        Trainer(student(veri, tmp_path, gallery, [{"name": "mqd"}, {"name": "reid_supervised"}]), progress=False)
    with pytest.raises(ConfigError, match="ACD's loss is added by gallery_frozen: false"):
        Trainer(student(veri, tmp_path, gallery, [{"name": "mqd"}, {"name": "acd"}]), progress=False)
    with pytest.raises(ConfigError, match="unknown loss 'mqdd'"):
        Trainer(student(veri, tmp_path, gallery, [{"name": "mqdd"}]), progress=False)


def test_the_aml_recipe_refuses_what_its_batches_cannot_feed(mini, tmp_path):
    sym = aml_config(mini, tmp_path, {"terms": [{"name": "contrastive"}, {"name": "regression"}], "mode": "symmetric"})
    with pytest.raises(ConfigError, match="loss 'regression' distils from a gallery network"):
        Trainer(sym, progress=False)
    forced = aml_config(mini, tmp_path, [{"name": "regression"}, {"name": "attentive"}])
    forced.train.recipe = "aml"
    with pytest.raises(ConfigError, match="loss 'attentive' needs uncertainty, which the AML recipe"):
        Trainer(forced, progress=False)
