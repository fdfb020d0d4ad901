"""Every pair config of ACD's other benchmarks (MSMT17, In-Shop, SOP, CUB-200-2011) builds and co-trains.

Each pair's ``d3still_acd.yaml`` is loaded as shipped, then only what a CPU test must change is changed:
random weights (no downloads, no earlier runs), inputs shrunk to a few pixels in the config's aspect ratio,
the mini render of its dataset as data (so ``num_classes`` is the mini's), small batches. Then the trainer
builds both networks from the config, RAHO measures the gallery's blocks, and one ACD step runs: the loss
is finite, the gallery network moves and the frozen query network does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asymret.config import load_config
from asymret.mini import ensure_mini_acd
from asymret.training.config import ExperimentConfig
from asymret.training.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "reid"
BENCHMARKS = ("msmt17", "inshop", "sop", "cub200")
PAIRS = sorted(p.parent for b in BENCHMARKS for p in (CONFIGS / b).glob("*/d3still_acd.yaml"))
# One pair per dataset and per gallery/query architecture runs by default (an R101 step takes seconds on a
# CPU); the others repeat an architecture at another resolution or on another dataset and are marked slow.
DEFAULT = {"cub200/r101-256_r18-64", "inshop/r101-256_mbv3s-64", "msmt17/r101ibn-320x160_r18-160x80",
           "sop/swinv2s-256_r18-64"}


def pair_param(pair: Path):
    name = pair.relative_to(CONFIGS).as_posix()
    return pytest.param(pair, id=name, marks=() if name in DEFAULT else pytest.mark.slow)


@pytest.fixture(scope="module")
def minis(tmp_path_factory):
    return ensure_mini_acd(tmp_path_factory.mktemp("mini-acd"), size="tiny")


def tiny_input(spec: dict, long_side: int) -> dict:
    """The spec with random weights at an input of ``long_side`` pixels in its configured aspect ratio."""
    h, w = spec["input"]["size"]
    size = [long_side, max(8, round(long_side * w / h))] if h >= w else [max(8, round(long_side * h / w)), long_side]
    spec = {**spec, "pretrained": False, "weights": None, "input": {**spec["input"], "size": size}}
    if spec["backbone"].startswith("swin"):  # timm's Swin is built for one input size
        spec["backbone_kwargs"] = {**spec["backbone_kwargs"], "img_size": size}
    return spec


def test_every_pair_of_the_acd_code_is_there():
    assert DEFAULT <= {p.relative_to(CONFIGS).as_posix() for p in PAIRS}
    assert [p.relative_to(CONFIGS).as_posix() for p in PAIRS] == [
        "cub200/r101-256_r18-64",
        "inshop/r101-256_mbv3s-64", "inshop/r101-256_r18-64", "inshop/r101-384_r18-64", "inshop/swinv2s-256_r18-64",
        "msmt17/r101-320x160_mbv3s-160x80", "msmt17/r101-320x160_r18-160x80", "msmt17/r101-480x240_r18-160x80",
        "msmt17/r101ibn-320x160_r18-160x80",
        "sop/r101-256_mbv3s-64", "sop/r101-256_r18-64", "sop/r101-384_r18-64", "sop/swinv2s-256_r18-64"]


@pytest.mark.parametrize("pair", [pair_param(p) for p in PAIRS])
def test_pair_builds_and_runs_one_acd_step(pair, minis, tmp_path):
    benchmark = pair.parent.name
    shipped = load_config(pair / "d3still_acd.yaml", model=ExperimentConfig)
    swin = shipped.gallery_net.backbone.startswith("swinv2_small")
    assert shipped.acd.tau == (4.0 if swin else 2.0) and not shipped.gallery_frozen
    cfg = shipped.model_dump(mode="json")
    counts = minis["counts"][f"mini-{benchmark}"]
    classes = counts.get("train_ids") or counts.get("train_items") or counts["train_classes"]
    root = str(minis[benchmark])
    cfg.update(output_dir=str(tmp_path), data={**cfg["data"], "root": root, "num_workers": 0},
               eval={**cfg["eval"], "root": root}, acd={**cfg["acd"], "pair": None, "raho_batches": 1})
    # 32 px on the query side: RAHO's cross-resolution branch runs the gallery at the query's input, and
    # IBN's instance norm needs more than one pixel in layer3
    cfg["query_net"] = {**tiny_input(cfg["query_net"], 32), "num_classes": classes}
    cfg["gallery_net"] = {**tiny_input(cfg["gallery_net"], 64), "num_classes": classes}
    cfg["train"] = {**cfg["train"], "epochs": 1, "validate_every": 0, "amp": False,
                    "reid": {**cfg["train"]["reid"], "ids_per_batch": 2, "images_per_id": 2, "distill_batch_size": 4}}
    trainer = Trainer(ExperimentConfig.model_validate(cfg), progress=False)
    assert trainer.trained == "gallery_net"
    report = json.loads((tmp_path / shipped.name / "raho.json").read_text())
    if swin:  # RAHO as the ACD code runs it on Swin: the high-resolution branch alone
        assert not report["cross_resolution"] and report["U_cr"] == []
        assert report["blocks"][0]["name"] == "layers.0.blocks.0"
    query_before = {k: v.clone() for k, v in trainer.query_net.state_dict().items()}
    gallery_before = {k: v.clone() for k, v in trainer.gallery_net.state_dict().items()}

    pk_loader, pk, d_loader, ds = trainer.recipe.loaders(0)
    trainer.recipe.train_mode()
    out = trainer.recipe.step(next(iter(pk_loader)), next(iter(pk)), next(iter(d_loader)), next(iter(ds)))
    assert torch.isfinite(out.total) and {"base", "acd_gallery_kl", "acd_collab_kl"} <= out.parts.keys()
    trainer.optimizer.zero_grad()
    out.total.backward()
    trainer.optimizer.step()
    assert all(torch.equal(v, query_before[k]) for k, v in trainer.query_net.state_dict().items())
    assert any(not torch.equal(v, gallery_before[k]) for k, v in trainer.gallery_net.state_dict().items())
