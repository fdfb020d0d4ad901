"""``asymret export``: a pair file's query or gallery side as an ONNX model, through the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from asymret.api.cli import main
from asymret.retrieval.encoders import create_encoder
from asymret.retrieval.export import OnnxEncoder
from asymret.retrieval.pair import load_pair, save_pair
from asymret.retrieval.sides import SideEncoder, embedding_space
from asymret.retrieval.whitening import Whitening
from tests.api.servekit import GALLERY_SPEC, QUERY_SPEC, make_pair, photo


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair") / "pair.pt")


@pytest.mark.parametrize("side", ["query", "gallery"])
def test_export_side(pair_file, tmp_path, capsys, side):
    out = tmp_path / "models" / f"{side}.onnx"
    assert main(["export", "--pair", str(pair_file), "--side", side, "--format", "onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "opset 17" in printed and " MB" in printed
    assert "embeddings (batch, 32)" in printed and "longer side 32" in printed and '"mean"' in printed
    assert "max |diff|" in printed

    pair = load_pair(pair_file)
    net = pair.query_net if side == "query" else pair.gallery_net
    model = OnnxEncoder(out)
    assert model.side == side and model.spec == net.spec and model.opset == 17 and model.dim == 32
    assert model.meta["pair"]["run"] == "test" and model.meta["pair_file"] == "pair.pt"
    assert model.meta["gallery_space"] == embedding_space(SideEncoder.gallery(pair).network_spec())
    image = photo(3, size=(40, 30))
    x = model.transform(image)[None]
    with torch.inference_mode():
        expected = net.encode_batch(x).numpy()
    assert np.abs(model.encode(x.numpy()) - expected).max() <= 1e-4


def test_export_with_whitening_and_opset(tmp_path, capsys):
    torch.manual_seed(0)
    whitening = Whitening.learn_pca(np.random.default_rng(0).standard_normal((64, 32)), dim=12)
    path = save_pair(tmp_path / "pair.pt", create_encoder(QUERY_SPEC), create_encoder(GALLERY_SPEC), whitening)
    out = tmp_path / "q.onnx"
    assert main(["export", "--pair", str(path), "--side", "query", str(out), "--opset", "15"]) == 0
    printed = capsys.readouterr().out
    assert "pca whitening" in printed and "opset 15" in printed and "embeddings (batch, 12)" in printed
    pair = load_pair(path)
    x = torch.randn(4, 3, 24, 32)
    with torch.inference_mode():
        expected = pair.whitening(pair.query_net.encode_batch(x)).numpy()
    assert np.abs(OnnxEncoder(out).encode(x.numpy()) - expected).max() <= 1e-4


def test_user_errors_print_one_line(tmp_path, capsys):
    multiscale = {**GALLERY_SPEC, "input": {"size": 32, "scales": [1, 0.7071, 0.5]}}
    path = save_pair(tmp_path / "ms.pt", create_encoder(QUERY_SPEC), create_encoder(multiscale))
    assert main(["export", "--pair", str(path), "--side", "gallery", str(tmp_path / "g.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ONNX export takes single-scale encoders") and "input.scales: [1]" in err
    assert not (tmp_path / "g.onnx").exists()
    assert main(["export", "--pair", str(tmp_path / "none.pt"), "--side", "query", str(tmp_path / "q.onnx")]) == 2
    assert "pair file not found" in capsys.readouterr().err
    assert main(["export", "--pair", str(path), "--side", "query", str(tmp_path / "q.onnx"), "--opset", "99"]) == 2
    assert "opset 99 is not supported" in capsys.readouterr().err
