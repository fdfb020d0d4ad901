"""Every shipped config resolves, validates, names a real timm model and a registered loss."""

from __future__ import annotations

import functools
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
    assert len([p for p in CONFIGS if p.parent.name == "galleries" and p.parts[-3] == "veri776"]) == 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_config_is_valid(path):
    cfg = load_config(path, model=ExperimentConfig)
    assert cfg.loss.name in LOSSES
    for spec in (cfg.query_net, cfg.gallery_net):
        assert timm.is_model(spec.backbone), spec.backbone


ACD_DATASETS = {"msmt17": 1041, "inshop": 3997, "sop": 11318, "cub200": 100}  # training identities


@functools.cache
def step1_config(path: Path) -> ExperimentConfig:
    return load_config(path, model=ExperimentConfig)


def test_acd_benchmark_configs_follow_the_supplementary():
    """ACD A.1: 10 co-training epochs on MSMT17, 20 on In-Shop, SOP and CUB-200-2011; distillation batches of
    128 for ResNet101 at 384² / 480 × 240 and Swin-V2-S, else 256; τ = 4 for the Swin gallery."""
    pairs = [p for p in CONFIGS if p.parts[-3] in ACD_DATASETS and p.parent.name != "galleries"]
    galleries = {p.stem: p for p in CONFIGS if p.parent.name == "galleries" and p.parts[-3] in ACD_DATASETS}
    assert len(pairs) == 13 * 6 * 2 and len([p for p in CONFIGS if p.parent.name == "galleries"
                                             and p.parts[-3] in ACD_DATASETS]) == 3 + 3 + 3 + 1
    for path in pairs:
        dataset = path.parts[-3]
        cfg = load_config(path, model=ExperimentConfig)
        assert cfg.data.format == cfg.eval.benchmark == dataset and cfg.train.recipe == "reid"
        assert cfg.query_net.num_classes == cfg.gallery_net.num_classes == ACD_DATASETS[dataset]
        swin = cfg.gallery_net.backbone == "swinv2_small_window8_256"
        gallery_run = cfg.gallery_net.weights.removeprefix("runs/").removesuffix("/query_net.pt") \
            if cfg.gallery_frozen else None
        if cfg.gallery_frozen:
            step1 = step1_config(path.parents[1] / "galleries" / f"{gallery_run.split('_gallery_')[1]}.yaml")
            assert step1.name == gallery_run and step1.query_net.backbone == cfg.gallery_net.backbone
            assert step1.query_net.input.size == cfg.gallery_net.input.size
            assert cfg.train.epochs == 120 and cfg.train.reid.distill_batch_size == 256
        else:
            assert cfg.acd.pair == f"runs/{cfg.name.removesuffix('_acd')}/pair.pt"
            assert cfg.train.epochs == (10 if dataset == "msmt17" else 20) and cfg.train.optim.warmup_epochs == 0
            large = swin or tuple(cfg.gallery_net.input.size) in ((384, 384), (480, 240))
            assert cfg.train.reid.distill_batch_size == (128 if large else 256)
            assert cfg.acd.tau == (4.0 if swin else 2.0) and cfg.acd.raho_gamma == 0.05
            assert (cfg.train.optim.optimizer, cfg.train.optim.lr) == (("adamw", 1e-4) if swin else ("sgd", 0.01))
        assert cfg.train.reid.erasing == (0.0 if dataset == "cub200" else 0.5)
    assert set(galleries) == {"resnet101_320x160", "resnet101_480x240", "resnet101_ibn_a_320x160", "resnet101_256",
                              "resnet101_384", "swinv2_s_256"}
