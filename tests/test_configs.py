"""Every shipped config resolves, validates, names a real timm model and a registered loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm

from asymret.config import load_config
from asymret.retrieval import encoders  # noqa: F401  (registers the ResNet-IBN-a backbones in timm)
from asymret.training.config import ExperimentConfig
from asymret.training.losses import LOSSES

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml") if "_base_" not in p.parts)


def test_there_are_configs_for_every_seed_pair_and_loss():
    aml = [p for p in CONFIGS if p.parts[-3] == "aml"]
    assert len([p for p in CONFIGS if p.parts[-2] == "mini"]) == 8
    assert len(aml) == 2 * 2 * 7
    assert {p.stem for p in aml} == {"contrastive", "contr_plus", "triplet", "multi_similarity", "regression",
                                     "rkd", "darkrank"}
    # AML's tables are "GeM + learned whitening": its configs learn each network's Lw after training
    assert all(load_config(p, model=ExperimentConfig).whitening.learn for p in aml)


def test_there_are_veri_configs_for_every_seed_pair_and_method_with_and_without_acd():
    veri = [p for p in CONFIGS if p.parts[-3] == "veri776" and p.parent.name != "galleries"]
    assert len(veri) == 4 * 6 * 2 and {p.parent.name for p in veri} == {
        "r101-256_r18-128", "r101-384_r18-128", "r101-256_mbv3s-128", "r101ibn-256_r18-128"}
    for path in veri:
        cfg = load_config(path, model=ExperimentConfig)
        assert cfg.gallery_frozen == (not path.stem.endswith("_acd")) and cfg.train.recipe == "reid"
        assert cfg.gallery_net.last_stride == 1 and cfg.gallery_net.num_classes == cfg.query_net.num_classes == 576
        if not cfg.gallery_frozen:
            assert cfg.acd.pair == f"runs/{cfg.name.removesuffix('_acd')}/pair.pt" and cfg.train.epochs == 10
    assert len([p for p in CONFIGS if p.parent.name == "mini_veri"]) == 1 + 6 * 2
    assert len([p for p in CONFIGS if p.parent.name == "galleries"]) == 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_config_is_valid(path):
    cfg = load_config(path, model=ExperimentConfig)
    assert cfg.loss.name in LOSSES
    for spec in (cfg.query_net, cfg.gallery_net):
        assert timm.is_model(spec.backbone), spec.backbone
