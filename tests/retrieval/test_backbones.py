"""ResNet-IBN-a in timm's registry: where instance norm sits, what IBN computes, shapes with
last_stride 1, parameter counts from the architecture, and weights from local files only."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from asymret.errors import ConfigError
from asymret.retrieval import backbones, encoders
from asymret.retrieval.backbones import IBN
from asymret.retrieval.encoders import create_encoder

# (name, bottleneck?, blocks per stage)
ARCHS = [("resnet18_ibn_a", False, (2, 2, 2, 2)), ("resnet50_ibn_a", True, (3, 4, 6, 3))]


def resnet_parameters(bottleneck: bool, layers: tuple[int, ...], num_classes: int = 1000) -> int:
    """Parameters of a torchvision-layout ResNet counted from its definition (He et al., Table 1).

    IBN-a splits some BatchNorms into InstanceNorm + BatchNorm with the same affine parameters in total.
    """
    def conv(cin, cout, k):
        return cin * cout * k * k

    def bn(c):
        return 2 * c

    total = conv(3, 64, 7) + bn(64)
    cin = 64
    for stage, n in enumerate(layers):
        width = 64 * 2**stage
        cout = width * (4 if bottleneck else 1)
        for b in range(n):
            if bottleneck:
                total += conv(cin, width, 1) + bn(width) + conv(width, width, 3) + bn(width)
                total += conv(width, cout, 1) + bn(cout)
            else:
                total += conv(cin, width, 3) + bn(width) + conv(width, width, 3) + bn(width)
            if b == 0 and (cin != cout or stage > 0):
                total += conv(cin, cout, 1) + bn(cout)
            cin = cout
    return total + cin * num_classes + num_classes


@pytest.mark.parametrize("name,bottleneck,layers", ARCHS + [("resnet101_ibn_a", True, (3, 4, 23, 3))])
def test_parameter_count_matches_the_architecture(name, bottleneck, layers):
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == resnet_parameters(bottleneck, layers)


def test_the_count_reproduces_torchvision_published_numbers():
    assert resnet_parameters(False, (2, 2, 2, 2)) == 11_689_512  # resnet18
    assert resnet_parameters(True, (3, 4, 6, 3)) == 25_557_032  # resnet50
    assert resnet_parameters(True, (3, 4, 23, 3)) == 44_549_160  # resnet101


@pytest.mark.parametrize("name,bottleneck,layers", ARCHS)
def test_instance_norm_on_half_of_bn1_in_layers_1_to_3_only(name, bottleneck, layers):
    model = timm.create_model(name)
    for stage in ("layer1", "layer2", "layer3"):
        for block in getattr(model, stage):
            planes = block.conv1.out_channels
            assert isinstance(block.bn1, IBN)
            assert block.bn1.IN.num_features == planes // 2 and block.bn1.IN.affine
            assert block.bn1.BN.num_features == planes - planes // 2
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in model.layer4.modules())
    assert isinstance(model.bn1, nn.BatchNorm2d)  # the stem keeps batch norm in IBN-a
    n_in = sum(isinstance(m, nn.InstanceNorm2d) for m in model.modules())
    assert n_in == sum(layers[:3])


def test_ibn_is_instance_norm_then_batch_norm_on_the_channel_halves():
    ibn = IBN(6).train()
    with torch.no_grad():
        ibn.IN.weight.copy_(torch.tensor([2.0, 3.0, 4.0]))
        ibn.BN.bias.copy_(torch.tensor([1.0, -1.0, 0.5]))
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    expected_in = F.instance_norm(x[:, :3], weight=ibn.IN.weight, bias=ibn.IN.bias)
    mean, var = x[:, 3:].mean((0, 2, 3), keepdim=True), x[:, 3:].var((0, 2, 3), unbiased=False, keepdim=True)
    expected_bn = (x[:, 3:] - mean) / torch.sqrt(var + 1e-5) + ibn.BN.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(ibn(x), torch.cat([expected_in, expected_bn], 1), atol=1e-5, rtol=1e-5)


def test_shapes_and_last_stride_1_through_create_encoder():
    x = torch.randn(2, 3, 32, 32)
    stride32 = create_encoder({"backbone": "resnet50_ibn_a"}).eval()
    stride16 = create_encoder({"backbone": "resnet50_ibn_a", "last_stride": 1}).eval()
    reid = create_encoder({"backbone": "resnet18_ibn_a", "last_stride": 1, "head": "bnneck", "num_classes": 5})
    with torch.no_grad():
        assert stride32.feature_map(x).shape == (2, 2048, 1, 1)
        assert stride16.feature_map(x).shape == (2, 2048, 2, 2)
        out = reid.forward_train(x)
    assert out.feature.shape == (2, 512) and out.logits.shape == (2, 5)
    torch.testing.assert_close(out.feature.norm(dim=1), torch.ones(2))


def test_pretrained_without_a_local_file_says_to_give_weights():
    with pytest.raises(ConfigError, match="weights:"):
        timm.create_model("resnet50_ibn_a", pretrained=True)
    with pytest.raises(ConfigError, match="weights:"):
        create_encoder({"backbone": "resnet101_ibn_a", "pretrained": True})


def test_an_ibn_net_style_checkpoint_loads_as_a_local_file(tmp_path):
    source = timm.create_model("resnet18_ibn_a")  # keys as IBN-Net's release: layer1.0.bn1.IN.weight, fc.*
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    path = tmp_path / "resnet18_ibn_a.pth"
    torch.save(source.state_dict(), path)
    encoder = create_encoder({"backbone": "resnet18_ibn_a", "weights": str(path)})
    torch.testing.assert_close(encoder.backbone.layer2[1].bn1.IN.weight, source.layer2[1].bn1.IN.weight)
    via_timm = timm.create_model("resnet18_ibn_a", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    torch.testing.assert_close(via_timm.conv1.weight, source.conv1.weight)


def test_importing_encoders_registers_the_models():
    assert encoders.backbones is backbones  # so any create_encoder caller has them
    assert all(timm.is_model(f"resnet{depth}_ibn_a") for depth in (18, 34, 50, 101))
