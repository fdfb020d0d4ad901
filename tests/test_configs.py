"""Every shipped config resolves, validates, names a real timm model and a registered loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm

from asymret.config import load_config
from asymret.training.config import ExperimentConfig
from asymret.training.losses import LOSSES

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml") if "_base_" not in p.parts)


def test_there_are_configs_for_every_seed_pair_and_loss():
    aml = [p for p in CONFIGS if p.parts[-3] == "aml"]
    assert len([p for p in CONFIGS if p.parts[-2] == "mini"]) == 8
    assert len(aml) == 2 * 2 * 7
    assert {p.stem for p in aml} == {"contrastive", "contr_plus", "triplet", "multi_similarity", "regression",
                                     "rkd", "darkrank"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_config_is_valid(path):
    cfg = load_config(path, model=ExperimentConfig)
    assert cfg.loss.name in LOSSES
    for spec in (cfg.query_net, cfg.gallery_net):
        assert timm.is_model(spec.backbone), spec.backbone
