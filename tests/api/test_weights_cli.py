"""``asymret weights inspect`` and ``convert``: a cirtorch network becomes an asymret encoder checkpoint whose
descriptors equal the network's, and whose whitening reaches the pair file; torchvision state dicts convert too."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from asymret.api.cli import main
from asymret.retrieval.checkpoints import MOBILENETV2_IMAGENET, read_checkpoint_whitening
from asymret.retrieval.encoders import create_encoder
from asymret.retrieval.pair import load_pair, save_pair

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.fixture(scope="module")
def cirtorch_file(tmp_path_factory):
    """A cirtorch ResNet18-GeM file in the layout of train.py's save_checkpoint, with meta['Lw'] (numpy)."""
    torch.manual_seed(0)
    features = nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-2]).eval()
    rng = np.random.default_rng(0)
    lw = {mode: {"m": rng.normal(size=(512, 1)), "P": rng.normal(size=(512, 512))} for mode in ("ss", "ms")}
    state = {**{f"features.{k}": v for k, v in features.state_dict().items()}, "pool.p": torch.tensor([2.5])}
    meta = {"architecture": "resnet18", "local_whitening": False, "pooling": "gem", "regional": False,
            "whitening": False, **IMAGENET, "outputdim": 512, "Lw": {"retrieval-SfM-120k": lw}}
    path = tmp_path_factory.mktemp("cirtorch") / "retrievalSfM120k-resnet18-gem.pth"
    torch.save({"epoch": 1, "meta": meta, "state_dict": state}, path, _use_new_zipfile_serialization=False)
    return path, features, lw


def test_inspect_names_the_layout_tensors_and_meta(cirtorch_file, capsys):
    path, features, _ = cirtorch_file
    assert main(["weights", "inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "cirtorch" and info["tensors"] == len(features.state_dict()) + 1 and info["meta"]["architecture"] == "resnet18"
    assert info["Lw"] == {"retrieval-SfM-120k": {m: {"m": [512, 1], "P": [512, 512]} for m in ("ss", "ms")}}
    assert main(["weights", "inspect", MOBILENETV2_IMAGENET]) == 0
    text = capsys.readouterr().out
    assert "layout: state-dict" in text and "tensors: 312" in text


def test_convert_cirtorch_writes_an_encoder_whose_descriptors_and_whitening_are_the_networks(cirtorch_file, tmp_path,
                                                                                             capsys):
    path, features, lw = cirtorch_file
    out = tmp_path / "gem_r18.pt"
    assert main(["weights", "convert", "--from", "cirtorch", str(path), "--out", str(out), "--size", "64",
                 "--whitening", "retrieval-SfM-120k", "--multiscale"]) == 0
    assert "learned whitening retrieval-SfM-120k ms (512 -> 512)" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert saved["spec"]["input"]["scales"] == [1.0, 2 ** -0.5, 0.5] and saved["source"]["layout"] == "cirtorch"
    encoder = create_encoder({**saved["spec"], "weights": str(out)}).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = features(x).clamp(min=1e-6).pow(2.5).mean(dim=(-2, -1)).pow(1 / 2.5)
        torch.testing.assert_close(encoder(x), pooled / pooled.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-5)
    whitening = read_checkpoint_whitening(out)
    np.testing.assert_allclose(whitening.P.numpy(), lw["ms"]["P"], rtol=1e-6)
    # what the trainer's export does with it: the pair file carries the gallery network's whitening
    pair = load_pair(save_pair(tmp_path / "pair.pt", encoder, encoder, whitening=whitening))
    np.testing.assert_allclose(pair.whitening.m.numpy(), lw["ms"]["m"][:, 0], rtol=1e-6)


def test_convert_a_torchvision_state_dict_by_layout(tmp_path, capsys):
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), tmp_path / "tv.pth")
    out = tmp_path / "mbv2.pt"
    assert main(["weights", "convert", str(tmp_path / "tv.pth"), "--backbone", "mobilenetv2_100", "--out",
                 str(out)]) == 0
    assert "mobilenetv2_100 gem encoder, 1280-d" in capsys.readouterr().out
    assert read_checkpoint_whitening(out) is None
    create_encoder({"backbone": "mobilenetv2_100", "weights": str(out)})


def test_convert_errors_say_what_to_pass(cirtorch_file, tmp_path, capsys):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    assert main(["weights", "convert", str(tmp_path / "r18.pth"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "say which timm backbone it is with --backbone" in capsys.readouterr().err
    path, _, _ = cirtorch_file
    assert main(["weights", "convert", str(path), "--out", str(tmp_path / "x.pt"), "--whitening", "gl18"]) == 2
    assert "no ss whitening learned on gl18; it has retrieval-SfM-120k (ss/ms)" in capsys.readouterr().err
    assert main(["weights", "inspect", str(tmp_path / "absent.pth")]) == 2
    assert "weights file not found" in capsys.readouterr().err
