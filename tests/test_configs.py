"""Every shipped config resolves, validates, names a real timm model and a registered loss."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import timm

from asymret.config import load_config
from asymret.retrieval import encoders  # noqa: F401  (registers the ResNet-IBN-a backbones in timm)
from asymret.training.config import ExperimentConfig
from asymret.training.losses import LOSSES, create_loss
from asymret.training.sweep import plan

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
SWEEPS = sorted((CONFIG_ROOT.parent / "experiments" / "sweeps").glob("*.yaml"))
CONFIGS = sorted(p for p in CONFIG_ROOT.rglob("*.yaml") if "_base_" not in p.parts)


AML_PAIRS = {"mobilenetv2_vgg16", "mobilenetv2_resnet101", "efficientnet_b3_vgg16", "efficientnet_b3_resnet101"}
ROOT = CONFIG_ROOT.parent


def test_there_are_configs_for_every_seed_pair_and_loss():
    aml = [p for p in CONFIGS if p.parts[-3] == "aml" and p.parent.name in AML_PAIRS]
    assert len([p for p in CONFIGS if p.parts[-2] == "mini"]) == 8
    assert len(aml) == 2 * 2 * (7 + 2) and {p.parent.name for p in aml} == AML_PAIRS
    assert {p.stem for p in aml} == {"contrastive", "contr_plus", "triplet", "multi_similarity", "regression",
                                     "rkd", "darkrank", "contrastive_pos", "contrastive_self_pos"}
    # AML's tables are "GeM + learned whitening": its configs learn each network's Lw after training
    assert all(load_config(p, model=ExperimentConfig).whitening.learn for p in aml)


def test_every_config_names_the_table_row_it_reproduces():
    for path in CONFIGS:
        if path.parts[-3] == "aml" or "stfm" in path.parts or path.parts[-3:-1] == ("veri776", "r101-256_r18-64"):
            assert path.read_text().startswith(("# Reproduces", "# ACD's", "# Step 2 of ACD's", "# 3DG-STFM")), path


def test_aml_tables_5_and_6_ablation_rows():
    """SELF / Pos / NEG of Tables 5-6: Contr+ is SELF + Pos + NEG, regression SELF alone; without NEG no negatives."""
    rows = {"contrastive": ("contrastive", 5), "contr_plus": ("contr_plus", 5), "contrastive_pos": ("contrastive", 0),
            "contrastive_self_pos": ("contr_plus", 0), "regression": ("regression", 5)}
    for pair in AML_PAIRS:
        for stem, (loss, negatives) in rows.items():
            cfg = load_config(CONFIG_ROOT / "aml" / pair / f"{stem}.yaml", model=ExperimentConfig)
            assert (cfg.loss.name, cfg.train.mining.num_negatives, cfg.loss.mode) == (loss, negatives, "asymmetric")
            assert cfg.query_net.dim == {"vgg16": 512, "resnet101": 2048}[cfg.gallery_net.backbone]


def test_aml_table_7_networks_trained_alone():
    alone = {p.stem: load_config(p, model=ExperimentConfig) for p in CONFIGS if p.parent.name == "alone"}
    assert set(alone) == {"mobilenetv2_d512", "mobilenetv2_d2048", "efficientnet_b3_d512", "efficientnet_b3_d2048",
                          "vgg16", "resnet101"}
    for cfg in alone.values():
        assert cfg.loss.name == "contrastive" and cfg.loss.mode == "symmetric" and cfg.query_net.pooling == "gem"
    assert [alone[f"mobilenetv2_d{d}"].query_net.dim for d in (512, 2048)] == [512, 2048]
    assert alone["efficientnet_b3_d2048"].query_net.backbone == "efficientnet_b3"
    assert alone["resnet101"].loss.params == {"margin": 0.85} and alone["resnet101"].train.optim.lr == 5e-7


def test_acd_figures_pair_and_seed_002_table_4_rows():
    acd = load_config(CONFIG_ROOT / "reid/veri776/r101-256_r18-64/d3still_acd.yaml", model=ExperimentConfig)
    assert acd.query_net.input.size == (64, 64) and acd.gallery_net.input.size == (256, 256)
    assert (acd.acd.alpha, acd.acd.beta, acd.acd.raho_gamma, acd.gallery_frozen) == (3.0, 2.0, 0.05, False)
    assert acd.acd.pair == "runs/veri_r101-256_r18-64_d3still/pair.pt"
    for folder in ("reid/veri776/stfm", "reid/mini_veri/stfm"):
        rows = {s: load_config(CONFIG_ROOT / folder / f"{s}.yaml", model=ExperimentConfig)
                for s in ("unimodal", "mqd", "mqd_attentive")}
        assert rows["mqd_attentive"].loss.specs() == [("mqd", 4.0, {"focal": True}), ("attentive", 0.25, {})]
        assert rows["mqd"].loss.specs() == [("mqd", 4.0, {"focal": True})]
        assert rows["unimodal"].loss.specs() == [("reid_supervised", 1.0, {})] and rows["unimodal"].loss.mode == "symmetric"
        for cfg in rows.values():  # Eq. (9)'s λ0 = λ1 = 0.25 on the network's own supervision in every row
            assert cfg.train.reid.supervised["ce_weight"] == cfg.train.reid.supervised["triplet_weight"] == 0.25


ACD_METHODS = ["fitnet", "cc", "csd", "raml", "rop", "d3still"]  # the ACD supplementary's Table 1 (VeRi-776)
D3STILL_ONLY = ["vanilla_kd", "pkt", "ugd"]  # D3still's other baselines: frozen gallery only


def test_there_are_veri_configs_for_every_seed_pair_and_method_with_and_without_acd():
    veri = [p for p in CONFIGS if p.parts[-3] == "veri776" and p.parent.name not in ("galleries", "stfm",
                                                                                       "r101-256_r18-64")]
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
    assert len([p for p in CONFIGS if p.parent.name == "galleries" and p.parts[-3] == "veri776"]) == 3


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


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_ROOT)))
def test_config_is_valid(path):
    cfg = load_config(path, model=ExperimentConfig)
    for name, weight, params in cfg.loss.specs():
        assert name in LOSSES and weight >= 0
        create_loss(name, **params)  # every parameter a config sets is one the loss has
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


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_file_is_valid(path):
    """Every point of a shipped sweep resolves to a valid config (``asymret sweep --dry-run`` would list it)."""
    sweep, base, runs = plan(path)
    assert base.is_relative_to(CONFIG_ROOT) and runs
    for run in runs:
        for name, _, params in run.cfg.loss.specs():
            create_loss(name, **params)
        assert run.cfg.output_dir == f"{sweep.output_dir}/{sweep.name}"


def test_the_acd_figures_sweeps():
    for name in ("acd_figs_veri776", "acd_figs_mini"):
        sweep, _, runs = plan(CONFIG_ROOT.parent / "experiments" / "sweeps" / f"{name}.yaml")
        assert sweep.keys == ["acd.alpha", "acd.beta", "acd.raho_gamma"]
        assert sweep.metrics == ["asymmetric.mAP", "asymmetric.R1", "sir.mAP", "sir.R1"]  # the figures' 4 panels
        assert len(runs) == 18 and len({r.run_dir for r in runs}) == 16  # the paper's point is one run for all 3
        assert all(not r.cfg.gallery_frozen for r in runs)
