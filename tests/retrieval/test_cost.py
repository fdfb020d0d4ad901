"""Encoder cost: parameters and torch's FLOP count, checked against a hand count from the layers' shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asymret.retrieval.cost import count_flops, encoder_cost, pair_cost
from asymret.retrieval.encoders import create_encoder


def hand_flops(encoder, h: int, w: int) -> int:
    """2 x multiply-adds of every conv and linear layer, from the output shapes seen by forward hooks."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += 2 * output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += 2 * output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in encoder.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        encoder.eval()(torch.zeros(1, 3, h, w))
    for handle in handles:
        handle.remove()
    return total


@pytest.mark.parametrize("spec", [
    {"backbone": "resnet10t", "input": {"size": 48}, "head": "fc", "fc_dim": 16},
    {"backbone": "mobilenetv2_035", "dim": 32, "input": {"size": [40, 24]}},
])
def test_flops_equal_a_hand_count_of_conv_and_linear_layers(spec):
    encoder = create_encoder(spec)
    h, w = (spec["input"]["size"],) * 2 if isinstance(spec["input"]["size"], int) else spec["input"]["size"]
    assert count_flops(encoder) == hand_flops(encoder, h, w) > 0


def test_scales_add_up_and_the_identity_classifier_is_not_counted():
    one = create_encoder({"backbone": "resnet10t", "input": {"size": 64}})
    three = create_encoder({"backbone": "resnet10t", "input": {"size": 64, "scales": [1, 0.5]}})
    three.load_state_dict(one.state_dict())
    assert count_flops(three) == count_flops(one) + hand_flops(one, 32, 32)
    reid = create_encoder({"backbone": "resnet10t", "head": "bnneck", "num_classes": 1000, "input": {"size": [32, 16]}})
    plain = sum(p.numel() for p in reid.parameters()) - 512 * 1000
    cost = encoder_cost(reid)
    assert cost["params"] == plain and cost["input"] == [32, 16]


def test_pair_cost_names_both_sides_and_a_lower_resolution_costs_less():
    g = create_encoder({"backbone": "resnet10t", "input": {"size": 64}})
    q = create_encoder({"backbone": "resnet10t", "input": {"size": 32}})
    cost = pair_cost(q, g)
    assert set(cost) == {"query_net", "gallery_net"}
    assert cost["query_net"]["params"] == cost["gallery_net"]["params"]
    assert cost["query_net"]["gflops"] == pytest.approx(cost["gallery_net"]["gflops"] / 4, rel=0.05)


def test_resnet50_at_224_px_costs_the_published_4_1_gmacs():
    """He et al. 2016 (Table 1) and timm: ResNet-50 at 224 x 224 is 4.1 G multiply-adds, 8.2 GFLOPs at 2 per MAC."""
    cost = encoder_cost(create_encoder({"backbone": "resnet50", "pooling": "avg", "input": {"size": [224, 224]}}))
    assert cost["gflops"] == pytest.approx(8.2, rel=0.05)
    assert cost["params"] == pytest.approx(23.5e6, rel=0.01)  # 25.6 M less the 2.05 M of the 1000-class fc
