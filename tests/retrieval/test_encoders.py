"""Encoders: shapes, GeM, last stride, re-ID head, multi-scale, weights files, preprocessing.

Tiny random-init timm models at 32-64 px; every number is checked against a second computation
written here (numpy power means, hand-made BN/linear algebra, timm's own forward).
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from asymret.errors import ConfigError
from asymret.retrieval.encoders import GeM, create_encoder, encoder_checkpoint, eval_mode, gem
from asymret.retrieval.specs import MULTISCALE, EncoderSpec, InputSpec
from asymret.retrieval.transforms import build_transform

SMALL = "resnet10t"  # dense convs: cheap first calls on CPU, unlike depthwise-heavy nets


def spec(**kw) -> EncoderSpec:
    kw.setdefault("backbone", SMALL)
    kw.setdefault("input", InputSpec(size=64))
    return EncoderSpec(**kw)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 64, 48, generator=torch.Generator().manual_seed(0))


def numpy_power_mean(x: np.ndarray, p: float, axis) -> np.ndarray:
    return np.mean(np.maximum(x, 1e-6) ** p, axis=axis) ** (1 / p)


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize(
    "kw, dim",
    [
        ({}, 512),
        ({"dim": 32, "pooling": "avg"}, 32),
        ({"backbone": "mobilenetv2_035", "pooling": "max"}, 1280),
    ],
)
def test_output_shape_dim_and_unit_norm(images, kw, dim):
    encoder = create_encoder(spec(**kw))
    out = encoder.encode_batch(images)
    assert encoder.dim == dim and out.shape == (3, dim)
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_gem_is_the_power_mean_of_the_feature_map(images):
    encoder = create_encoder(spec(dim=16, gem_p=2.5)).eval()
    with torch.no_grad():
        fmap = encoder.feature_map(images).double().numpy()
        out = encoder.forward_train(images)
    expected = numpy_power_mean(fmap, 2.5, axis=(2, 3))
    np.testing.assert_allclose(out.raw.numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(out.feature.numpy(), l2n(expected), rtol=1e-4, atol=1e-6)


def test_gem_p_gets_the_gradient_of_the_power_mean():
    x = torch.rand(2, 4, 3, 3, dtype=torch.float64) + 0.1
    pool = GeM(3.0)
    pool(x.float()).sum().backward()
    h = 1e-4
    numeric = (gem(x, 3.0 + h) - gem(x, 3.0 - h)).sum() / (2 * h)
    assert pool.p.grad is not None
    assert float(pool.p.grad) == pytest.approx(float(numeric), rel=1e-3)


def test_gem_p_frozen_is_a_buffer_kept_in_the_state_dict():
    encoder = create_encoder(spec(gem_trainable=False, gem_p=4.0))
    assert all(p is not encoder.pool.p for p in encoder.parameters())
    assert float(encoder.state_dict()["pool.p"]) == 4.0


def test_param_groups_give_gem_p_ten_times_lr_and_no_weight_decay():
    encoder = create_encoder(spec(dim=8))
    groups = encoder.param_groups(1e-3)
    rest, pool = groups
    assert pool["params"] == [encoder.pool.p] and pool["lr"] == pytest.approx(1e-2)
    assert pool["weight_decay"] == 0.0 and rest["lr"] == 1e-3 and "weight_decay" not in rest
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in encoder.parameters())


def test_head_lr_mult_puts_projection_and_fc_head_in_their_own_group():
    encoder = create_encoder(spec(dim=8, head="fc", fc_dim=6))
    rest, head, pool = encoder.param_groups(1e-3, gem_lr_mult=5.0, head_lr_mult=100.0)
    expected_head = [*encoder.projection.parameters(), *encoder.fc.parameters()]
    assert [id(p) for p in head["params"]] == [id(p) for p in expected_head] and head["lr"] == pytest.approx(0.1)
    assert pool["lr"] == pytest.approx(5e-3) and rest["lr"] == 1e-3
    assert {id(p) for p in rest["params"]} == {id(p) for p in encoder.backbone.parameters()}


def test_fc_head_is_a_linear_layer_with_bias_on_the_normalised_pooled_vector(images):
    encoder = create_encoder(spec(head="fc", fc_dim=24)).eval()
    assert encoder.dim == 24 and encoder.fc.bias is not None and encoder.multiscale_power == 1.0
    with torch.no_grad():
        pooled = gem(encoder.backbone.forward_features(images), encoder.pool.p).numpy().astype(np.float64)
        w, b = encoder.fc.weight.numpy().astype(np.float64), encoder.fc.bias.numpy().astype(np.float64)
        np.testing.assert_allclose(encoder(images).numpy(), l2n(l2n(pooled) @ w.T + b), atol=1e-5)
    assert create_encoder(spec(head="fc")).dim == 512  # default: the pooled size


# strided-conv and avg-pool downsample (ResNets); the last strided depthwise conv (MobileNetV3, EfficientNet)
@pytest.mark.parametrize("backbone", ["resnet18", "resnet10t", "mobilenetv3_small_050", "efficientnet_b0"])
def test_last_stride_1_doubles_the_final_map(backbone):
    images = torch.randn(1, 3, 64, 96)
    normal = create_encoder(spec(backbone=backbone))
    reid = create_encoder(spec(backbone=backbone, last_stride=1))
    with torch.no_grad():
        assert normal.feature_map(images).shape[-2:] == (2, 3)
        assert reid.feature_map(images).shape[-2:] == (4, 6)


def test_last_stride_1_without_a_known_downsampling_is_a_config_error():
    with pytest.raises(ConfigError, match="ResNet"):
        create_encoder(spec(backbone="vit_tiny_patch16_224", last_stride=1, input={"size": [224, 224]}))


def test_bnneck_head_shapes_bias_free_and_logits_from_the_feature(images):
    encoder = create_encoder(spec(dim=24, head="bnneck", num_classes=7))
    out = encoder.forward_train(images)
    assert out.feature.shape == out.raw.shape == (3, 512) and out.logits.shape == (3, 7)
    assert encoder.dim == 512
    assert encoder.head.classifier.bias is None and encoder.head.neck[2].bias is None
    np.testing.assert_allclose(out.feature.norm(dim=1).detach().numpy(), 1.0, atol=1e-5)
    W = encoder.head.classifier.weight.detach().numpy()
    np.testing.assert_allclose(
        out.logits.detach().numpy(), out.raw.detach().numpy() @ W.T, rtol=1e-4, atol=1e-5
    )


def test_bnneck_feature_in_eval_mode_matches_hand_computed_head(images):
    encoder = create_encoder(spec(dim=24, head="bnneck", num_classes=3))
    bn1, _, linear, bn2 = encoder.head.neck
    for bn in (bn1, bn2):  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    encoder.eval()
    with torch.no_grad():
        pooled = encoder.pool(encoder.feature_map(images)).double().numpy()
        raw = encoder.forward_train(images).raw.numpy()

    def bn(x, m):
        return (x - m.running_mean.double().numpy()) / np.sqrt(m.running_var.double().numpy() + m.eps) * (
            m.weight.detach().double().numpy()
        ) + m.bias.detach().double().numpy()

    expected = bn(np.maximum(bn(pooled, bn1), 0) @ linear.weight.detach().double().numpy().T, bn2)
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooling, head", [("gem", "none"), ("avg", "none"), ("gem", "bnneck")])
def test_multiscale_is_the_power_mean_over_scales(images, pooling, head):
    encoder = create_encoder(
        spec(pooling=pooling, head=head, dim=16, input=InputSpec(size=64, scales=MULTISCALE))
    )
    encoder.eval()
    with torch.no_grad():
        per_scale = [
            encoder(
                F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
                if s != 1
                else images
            )
            for s in MULTISCALE
        ]
    f = np.stack([t.double().numpy() for t in per_scale])
    p = encoder.pool.p.item() if pooling == "gem" and head == "none" else 1.0
    expected = l2n(f.mean(0)) if p == 1 else l2n(numpy_power_mean(f, p, axis=0))
    np.testing.assert_allclose(encoder.encode_batch(images).numpy(), expected, rtol=1e-4, atol=1e-6)


def test_encode_batch_runs_in_eval_mode_and_restores_training(images):
    encoder = create_encoder(spec(head="bnneck", num_classes=2)).train()
    stats = encoder.head.neck[0].running_mean.clone()
    out = encoder.encode_batch(images)
    assert encoder.training and torch.equal(encoder.head.neck[0].running_mean, stats)
    encoder.eval()
    assert torch.equal(out, encoder(images).detach())


def test_eval_mode_leaves_an_eval_module_alone_and_restores_a_mixed_one(monkeypatch):
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).eval()
    calls = []
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: calls.append(mode) or self)
    with eval_mode(net) as inside:  # the server's case: already eval throughout, so no walk over the modules
        assert inside is net and not net.training
    assert calls == []
    monkeypatch.undo()
    net.train()
    net[1].eval()  # a frozen BatchNorm inside a training network
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert net.training and net[0].training  # as before: train(True) on the way out


def test_backbone_state_dict_with_classifier_loads_into_the_backbone(tmp_path, images):
    timm_model = timm.create_model(SMALL, num_classes=10).eval()  # with its fc classifier
    path = tmp_path / "backbone.pth"
    # as torchvision's older zoo files: no BatchNorm num_batches_tracked
    torch.save({k: v for k, v in timm_model.state_dict().items() if "num_batches_tracked" not in k}, path)
    encoder = create_encoder(spec(weights=str(path))).eval()
    with torch.no_grad():
        expected = timm_model.forward_features(images)
        assert torch.equal(encoder.feature_map(images), expected)


def test_encoder_checkpoint_and_wrapped_ddp_state_dict_reload_identically(tmp_path, images):
    source = create_encoder(spec(dim=16, head="bnneck", num_classes=4, gem_p=2.0)).eval()
    torch.save(encoder_checkpoint(source), tmp_path / "enc.pt")
    ddp = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": torch.tensor(3)}
    torch.save(ddp, tmp_path / "ddp.pt")
    for name in ("enc.pt", "ddp.pt"):
        loaded = create_encoder(source.spec.model_copy(update={"weights": str(tmp_path / name)})).eval()
        assert loaded.pool.p.item() == 2.0
        assert torch.equal(loaded.encode_batch(images), source.encode_batch(images))


def test_weights_that_fit_nothing_give_counts_of_missing_and_unexpected_keys(tmp_path):
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")  # not a resnet10t
    with pytest.raises(ConfigError, match=r"\d+ missing keys .*\d+ unexpected keys"):
        create_encoder(spec(weights=str(tmp_path / "r18.pth")))


def test_unreadable_or_missing_weights_are_config_errors(tmp_path):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module, not a state dict
    for name in ("junk.pt", "module.pt", "absent.pt"):
        with pytest.raises(ConfigError, match="weights file"):
            create_encoder(spec(weights=str(tmp_path / name)))


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ConfigError, match="resnet18"):
        create_encoder(spec(backbone="resnet_18"))


def test_transform_longer_side_keeps_aspect_and_never_enlarges():
    transform = build_transform(InputSpec(size=64))
    assert transform(Image.new("RGB", (200, 100))).shape == (3, 32, 64)
    assert transform(Image.new("RGB", (30, 40))).shape == (3, 40, 30)


def test_transform_fixed_size_and_normalisation():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    transform = build_transform(InputSpec(size=(32, 16), mean=mean, std=std))
    out = transform(Image.new("RGB", (50, 70), (255, 51, 0)))
    assert out.shape == (3, 32, 16)
    expected = (np.array([255, 51, 0]) / 255 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)


def test_stage_maps_are_the_four_stages_the_d3still_code_calls_feats(images):
    # D3still's UGD.py: ResNet18 [64, 128, 256, 512], MobileNetV3-Small [16, 24, 48, 576] channels
    assert create_encoder(spec(backbone="resnet18")).stage_channels() == [64, 128, 256, 512]
    assert create_encoder(spec(backbone="mobilenetv3_small_100")).stage_channels() == [16, 24, 48, 576]
    net = create_encoder(spec(head="bnneck", num_classes=5, last_stride=1)).eval()
    out = net.forward_train(images, stages=True)
    bb = net.backbone
    h = bb.maxpool(bb.act1(bb.bn1(bb.conv1(images))))
    for got, layer in zip(out.stages, (bb.layer1, bb.layer2, bb.layer3, bb.layer4), strict=True):
        h = layer(h)
        assert torch.equal(got, h)
    assert torch.equal(out.fmap, h) and net.forward_train(images).stages is None
    assert not bb.layer1._forward_hooks  # the hooks are gone after the pass
    # local features: the head's BN-neck on each cell of the map average-pooled to grid × grid
    local = net.local_features(out.fmap, 1)
    assert torch.allclose(local[:, 0], net.head.neck(out.fmap.mean((2, 3))), atol=1e-6)
    with pytest.raises(ConfigError, match="four convolutional feature stages"):
        create_encoder(spec(backbone="vit_tiny_patch16_224", input=InputSpec(size=224))).stage_modules()
