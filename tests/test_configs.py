"""Every shipped config resolves, validates, names a real timm model and a registered loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm

from asymret.config import load_config
from asymret.retrieval import encoders  # noqa: F401  (registers the ResNet-IBN-a backbones in timm)
from asymret.training.config import ExperimentConfig
from asymret.training.losses import LOSSES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "_base_" not in p.parts)


def test_there_are_configs_for_every_seed_pair_and_loss():
    aml = [p for p in CONFIGS if p.parts[-3] == "aml"]
    assert len([p for p in CONFIGS if p.parts[-2] == "mini"]) == 8
    assert len(aml) == 2 * 2 * 7
    assert {p.stem for p in aml} == {"contrastive", "contr_plus", "triplet", "multi_similarity", "regression",
                                     "rkd", "darkrank"}


ACD_METHODS = ["fitnet", "cc", "csd", "raml", "rop", "d3still"]  # the ACD supplementary's Table 1 (VeRi-776)
D3STILL_ONLY = ["vanilla_kd", "pkt", "ugd"]  # D3still's other baselines: frozen gallery only


def test_there_are_veri_configs_for_every_seed_pair_and_method_with_and_without_acd():
    veri = [p for p in CONFIGS if p.parts[-3] == "veri776" and p.parent.name != "galleries"]
    assert len(veri) == 4 * (6 * 2 + 3) and {p.parent.name for p in veri} == {
        "r101-256_r18-128", "r101-384_r18-128", "r101-256_mbv3s-128", "r101ibn-256_r18-128"}
    assert {p.stem for p in veri} == {*ACD_METHODS, *(f"{m}_acd" for m in ACD_METHODS), *D3STILL_ONLY}
    for path in veri:
        cfg = load_config(path, model=ExperimentConfig)
        assert cfg.gallery_frozen == (not path.stem.endswith("_acd")) and cfg.train.recipe == "reid"
        assert cfg.gallery_net.last_stride == 1 and cfg.gallery_net.num_classes == cfg.query_net.num_classes == 576
        assert cfg.loss.name == path.stem.removesuffix("_acd")
        if not cfg.gallery_frozen:
            assert cfg.acd.pair == f"runs/{cfg.name.removesuffix('_acd')}/pair.pt" and cfg.train.epochs == 10
    mini = {p.stem for p in CONFIGS if p.parent.name == "mini_veri"}
    assert mini == {"gallery", *ACD_METHODS, *(f"{m}_acd" for m in ACD_METHODS), *D3STILL_ONLY}
    assert len([p for p in CONFIGS if p.parent.name == "galleries"]) == 3


def veri(pair: str, method: str) -> ExperimentConfig:
    return load_config(ROOT / "configs" / "reid" / "veri776" / pair / f"{method}.yaml", model=ExperimentConfig)


# ACD's own configs, Training_Configs/MSMT17/<pair>/<method>.yaml (KD_WEIGHT; D3's ALPHA/BETA/GAMMA): its one re-ID
# set, whose four pairs are the VeRi-776 columns. CSD/ROP TOPK equal the distillation batch there (k: the batch).
ACD_BASE = {
    "r101-256_r18-128": {"fitnet": 2.0, "cc": 5.0, "csd": 5.0, "raml": 5.0, "rop": 5.0, "d3still": 1.0},
    "r101-384_r18-128": {"fitnet": 2.0, "cc": 5.0, "csd": 5.0, "raml": 5.0, "rop": 1.0, "d3still": 1.0},
    "r101-256_mbv3s-128": {"fitnet": 0.5, "cc": 0.5, "csd": 1.0, "raml": 1.0, "rop": 1.0, "d3still": 0.2},
    "r101ibn-256_r18-128": {"fitnet": 2.0, "cc": 5.0, "csd": 5.0, "raml": 5.0, "rop": 5.0, "d3still": 1.0},
}


@pytest.mark.parametrize("pair", sorted(ACD_BASE))
def test_acd_configs_set_the_base_loss_weights_of_acds_own_configs(pair):
    for method, weight in ACD_BASE[pair].items():
        cfg = veri(pair, f"{method}_acd")
        assert cfg.acd.base_weight == 1.0 and cfg.loss.params["weight"] == weight, (pair, method)
        assert cfg.loss.params.get("k") is None  # CSD / ROP: the whole distillation batch, as TOPK there
    d3 = veri(pair, "d3still_acd").loss.params
    assert (d3["alpha"], d3["beta"], d3["gamma"]) == (50.0, 2.0, 1.0)
    assert veri(pair, "rop_acd").loss.params["tau_g"] == 0.1


@pytest.mark.parametrize("pair", sorted(ACD_BASE))
def test_d3still_only_baselines_carry_the_d3still_code_weights(pair):
    mobilenet = "mbv3s" in pair
    kd, pkt, ugd = (veri(pair, m) for m in D3STILL_ONLY)
    assert kd.loss.params == {"weight": 1.0, "temperature": 2.0} and pkt.loss.params == {"weight": 30000.0}
    assert ugd.loss.params == {"alpha": 5.0 if mobilenet else 2.0, "beta": 2.0, "layer": 3}
    assert ugd.train.reid.distill_batch_size == 96 and kd.train.reid.distill_batch_size == 256
    assert veri(pair, "raml").loss.params["weight"] == (20.0 if mobilenet else 10.0)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_config_is_valid(path):
    cfg = load_config(path, model=ExperimentConfig)
    assert cfg.loss.name in LOSSES
    for spec in (cfg.query_net, cfg.gallery_net):
        assert timm.is_model(spec.backbone), spec.backbone
