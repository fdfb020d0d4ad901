"""RAHO (ACD Eq. 12-13): block scores, U sets and learning-rate tiers on networks whose block
importances the test controls, checked against a second computation written here with numpy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asymret.errors import ConfigError
from asymret.retrieval.encoders import TrainOutput, create_encoder
from asymret.training.raho import raho, relation_discrepancy, renormalise, residual_blocks

C, CLASSES, HIGH, LOW, B = 6, 3, 8, 4, 8
LR, GAMMA = 0.01, 0.05


class Shift(nn.Module):
    """Adds a fixed vector to every position, so the block moves the pooled feature by exactly it.

    ``low_res_only``: acts only on query-resolution inputs, a block that matters only cross-resolution.
    """

    def __init__(self, shift, low_res_only: bool = False):
        super().__init__()
        self.shift = nn.Parameter(torch.as_tensor(shift, dtype=torch.float32))
        self.low_res_only = low_res_only

    def forward(self, x):
        if self.low_res_only and x.shape[-1] >= HIGH:
            return x
        return x + self.shift.view(1, -1, 1, 1)


def shifts(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(C, generator=g), 5.0 * torch.randn(C, generator=g)


class ToyBackbone(nn.Module):
    """ResNet-shaped: stem, layer1-layer4. Every shift is undone later, so the final pooled feature is
    the stem's: at gallery resolution only layer1.0 (moves away) and layer1.2 (moves back) matter; at
    query resolution layer3 does too, much more strongly."""

    def __init__(self, a, c):
        super().__init__()
        zero = torch.zeros(C)
        self.stem = nn.Conv2d(C, C, 1, bias=False)
        nn.init.eye_(self.stem.weight.view(C, C))
        self.layer1 = nn.Sequential(Shift(a), Shift(zero), Shift(-a))
        self.layer2 = nn.Sequential(Shift(zero), Shift(zero))
        self.layer3 = nn.Sequential(Shift(c, low_res_only=True), Shift(-c, low_res_only=True))
        self.layer4 = nn.Sequential(Shift(zero))

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


class ToyGallery(nn.Module):
    """An encoder's interface: ``backbone``, ``forward_train`` -> feature (L2, GAP) and logits."""

    def __init__(self, a, c):
        super().__init__()
        self.backbone = ToyBackbone(a, c)
        self.classifier = nn.Linear(C, CLASSES, bias=False)

    def forward_train(self, images):
        raw = self.backbone(images).mean((2, 3))
        feature = F.normalize(raw, dim=1)
        return TrainOutput(feature, raw, self.classifier(feature))


class GapQuery(nn.Module):
    """A query network whose embedding is the normalised GAP of its input."""

    def forward(self, images):
        return F.normalize(images.mean((2, 3)), dim=1)


NAMES = ["layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0"]
STAGES = [n.split(".")[0] for n in NAMES]


def make_batches(net: ToyGallery, n_batches: int = 3, seed: int = 0):
    """Gallery- and query-resolution images; labels right for the first 5 of 8 low-res predictions."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        hi = torch.randn(B, C, HIGH, HIGH, generator=g) + torch.randn(B, C, 1, 1, generator=g)
        lo = torch.randn(B, C, LOW, LOW, generator=g) + torch.randn(B, C, 1, 1, generator=g)
        predicted = (F.normalize(lo.mean((2, 3)), dim=1) @ net.classifier.weight.detach().T).argmax(1)
        labels = predicted.clone()
        labels[5:] = (predicted[5:] + 1) % CLASSES
        batches.append((hi, lo, labels))
    return batches


# ---------------------------------------------------------------- second computation, numpy only


def np_discrepancy(h: np.ndarray, reference: np.ndarray) -> float:
    h = h / np.linalg.norm(h, axis=1, keepdims=True)
    return float(np.mean([np.sqrt(np.sum((reference[i] - h @ h[i]) ** 2)) for i in range(len(h))]))


def np_pooled_after_each_block(images: np.ndarray, a: np.ndarray, c: np.ndarray, low: bool) -> list:
    """GAP of the stem output and of every block's output: the stem's GAP plus the shifts so far."""
    zero = np.zeros(C)
    steps = [a, zero, -a, zero, zero, c if low else zero, -c if low else zero, zero]
    gap = images.mean(axis=(2, 3))
    return [gap + sum(steps[:b], zero) for b in range(len(steps) + 1)]


def np_raw_scores(batches, a, c, classifier: np.ndarray | None = None) -> np.ndarray:
    """Batch-averaged ``s_b``; with the ``classifier`` weights, the cross-resolution branch."""
    cross = classifier is not None
    per_batch = []
    for hi, lo, labels in batches:
        h = np_pooled_after_each_block((lo if cross else hi).numpy().astype(np.float64), a, c, low=cross)
        final = h[-1] / np.linalg.norm(h[-1], axis=1, keepdims=True)
        if cross:  # rows the gallery classifies right; reference: GapQuery, i.e. the stem's GAP
            rows = np.flatnonzero((final @ classifier.T).argmax(1) == labels.numpy())
            q = h[0][rows] / np.linalg.norm(h[0][rows], axis=1, keepdims=True)
        else:
            rows, q = np.arange(len(final)), final
        d = [np_discrepancy(hb[rows], q @ q.T) for hb in h]
        per_batch.append([d[b - 1] - d[b] for b in range(1, len(d))])
    return np.mean(per_batch, axis=0)


def np_renormalise(s: np.ndarray) -> np.ndarray:
    out = np.empty_like(s)
    for stage in set(STAGES):
        rows = [i for i, st in enumerate(STAGES) if st == stage]
        e = np.exp(s[rows])
        out[rows] = len(rows) * e / e.sum()
    return out


# ------------------------------------------------------------------------------------------ tests


def test_discrepancy_and_renormalisation_by_hand():
    # orthogonal features against an all-ones reference: every row differs by one off-diagonal 1
    assert relation_discrepancy(torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.ones(2, 2)).item() == pytest.approx(1)
    # 2·softmax([0, ln 2]) = [2/3, 4/3]; a one-block stage always scores 1
    out = renormalise(torch.tensor([0.0, math.log(2), -7.0]), ["a", "a", "b"])
    assert out.tolist() == pytest.approx([2 / 3, 4 / 3, 1.0])


@pytest.fixture
def toy():
    torch.manual_seed(0)
    a, c = shifts(1)
    net = ToyGallery(a, c)
    return net, a.numpy().astype(np.float64), c.numpy().astype(np.float64)


def test_controlled_blocks_give_the_expected_sets_and_tiers(toy):
    net, _, _ = toy
    _, report = raho(net, make_batches(net), LR, query_net=GapQuery(), p=0.25, gamma=GAMMA)
    # gallery resolution: layer1.0 moves away from the final relations (lowest), layer1.1 does nothing
    # in a stage that matters (next lowest); at query resolution layer3.0's large shift is lowest
    assert report["U_hr"] == ["layer1.0", "layer1.1"]
    assert sorted(report["U_cr"]) == ["layer1.0", "layer3.0"]
    tiers = {b["name"]: b["tier"] for b in report["blocks"]}
    assert tiers == {"layer1.0": "eta", "layer1.1": "gamma*eta", **{n: "gamma^2*eta" for n in NAMES[2:]}}
    # the block before which d_0 is measured can itself be chosen: the first block is scored too
    assert [b["name"] for b in report["blocks"]] == NAMES


def test_scores_match_an_independent_computation_on_correctly_classified_samples_only(toy):
    net, a, c = toy
    batches = make_batches(net)
    _, report = raho(net, batches, LR, query_net=GapQuery(), p=0.25)
    weights = net.classifier.weight.detach().numpy().astype(np.float64)
    raw_hr = np_raw_scores(batches, a, c)
    raw_cr = np_raw_scores(batches, a, c, weights)
    got_hr = np.array([b["raw_score_hr"] for b in report["blocks"]])
    got_cr = np.array([b["raw_score_cr"] for b in report["blocks"]])
    np.testing.assert_allclose(got_hr, raw_hr, atol=1e-5)
    np.testing.assert_allclose(got_cr, raw_cr, atol=1e-5)
    np.testing.assert_allclose([b["score_hr"] for b in report["blocks"]], np_renormalise(raw_hr), atol=1e-5)
    np.testing.assert_allclose([b["score_cr"] for b in report["blocks"]], np_renormalise(raw_cr), atol=1e-5)
    assert report["cross_resolution_samples"] == 5 * len(batches)
    # the same scores over every low-resolution sample differ: the misclassified ones were left out
    everything = [(hi, lo, net.forward_train(lo).logits.argmax(1)) for hi, lo, _ in batches]
    assert not np.allclose(np_raw_scores(everything, a, c, weights), raw_cr, atol=1e-3)
    assert np.allclose(raw_hr[[1, 3, 4, 5, 6, 7]], 0, atol=1e-6)  # identity blocks score exactly 0


def test_param_groups_cover_every_trainable_parameter_once_with_its_tier_lr(toy):
    net, _, _ = toy
    net.backbone.layer4[0].shift.requires_grad_(False)
    groups, _ = raho(net, make_batches(net), LR, query_net=GapQuery(), p=0.25, gamma=GAMMA)
    lr_of = {}
    for group in groups:
        for prm in group["params"]:
            assert id(prm) not in lr_of
            lr_of[id(prm)] = group["lr"]
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert set(lr_of) == {id(p) for p in trainable}
    bb = net.backbone
    assert lr_of[id(bb.layer1[0].shift)] == pytest.approx(LR)
    assert lr_of[id(bb.layer1[1].shift)] == pytest.approx(GAMMA * LR)
    for prm in (bb.layer1[2].shift, bb.layer3[0].shift, bb.stem.weight, net.classifier.weight):
        assert lr_of[id(prm)] == pytest.approx(GAMMA**2 * LR)
    torch.optim.SGD(groups, lr=LR, momentum=0.9)  # valid optimiser groups


def test_without_a_query_network_u_cr_is_empty_so_nothing_gets_the_full_rate(toy):
    net, _, _ = toy
    _, report = raho(net, make_batches(net), LR, p=0.25, gamma=GAMMA)
    assert not report["cross_resolution"] and report["U_cr"] == []
    tiers = {b["name"]: b["tier"] for b in report["blocks"]}
    assert tiers["layer1.0"] == tiers["layer1.1"] == "gamma*eta"
    assert "eta" not in tiers.values()


def test_resnet18_encoder_blocks_and_a_json_report():
    spec = {"backbone": "resnet18", "head": "bnneck", "num_classes": CLASSES, "pooling": "avg", "last_stride": 1}
    gallery, query = create_encoder(spec), create_encoder({**spec, "last_stride": None})
    images = torch.randn(4, 3, 16, 16)
    batches = [(images, F.interpolate(images, size=8), torch.arange(4) % CLASSES)]
    groups, report = raho(gallery, batches, LR, query_net=query)
    assert [b.name for b in residual_blocks(gallery.backbone)] == [f"layer{i}.{j}" for i in range(1, 5)
                                                                 for j in range(2)]
    assert sum(len(g["params"]) for g in groups) == len(list(gallery.parameters()))
    assert len(report["U_hr"]) == int(0.3 * 8)
    json.dumps(report)


def test_swin_gallery_runs_the_high_resolution_branch_alone():
    swin = {"img_size": 32, "window_size": 4, "embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 1, 1, 1]}
    spec = {"backbone": "swinv2_tiny_window8_256", "backbone_kwargs": swin, "head": "bnneck",
            "num_classes": CLASSES, "pooling": "avg", "input": {"size": [32, 32]}}
    gallery = create_encoder(spec)
    images = torch.randn(4, 3, 32, 32)
    _, report = raho(gallery, [(images, F.interpolate(images, size=16), torch.zeros(4, dtype=torch.long))],
                     LR, query_net=GapQuery(), p=0.4)
    assert [b["name"] for b in report["blocks"]] == [
        "layers.0.blocks.0", "layers.1.blocks.0", "layers.2.blocks.0", "layers.2.blocks.1", "layers.3.blocks.0"]
    assert not report["cross_resolution"] and "ResNet-family" in report["cross_resolution_note"]
    assert len(report["U_hr"]) == 2 and report["U_cr"] == []
    # one-block stages always score 1, so the two-block stage holds the one block below 1
    scores = {b["name"]: b["score_hr"] for b in report["blocks"]}
    assert min(scores, key=scores.get).startswith("layers.2.")


def test_backbone_without_blocks_is_a_config_error():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3))

    with pytest.raises(ConfigError, match="finds no residual blocks"):
        raho(Plain(), [(torch.randn(2, 3, 8, 8), None, None)], LR)
