"""The MAC counter sees weight assembly and attention (SPEC section 4 figures)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import kernelwarehouse as kw
from kernelwarehouse.bench import count_macs


@pytest.mark.parametrize(
    "name, budget, expected",
    [("resnet18", None, 1.814e9), ("kw_resnet18", 1, 2.199e9), ("kw_resnet18", 4, 3.354e9)],
)
def test_resnet18_macs_match_the_paper_cost_model(name, budget, expected):
    model = kw.create_model(name, budget=budget) if budget else kw.create_model(name)
    macs = count_macs(model, (3, 224, 224))
    assert abs(macs.total - expected) / expected < 0.01
    if budget:
        assert macs.assembly > 0 and macs.attention > 0
        static = count_macs(kw.create_model("resnet18"), (3, 224, 224))
        assert macs.layers == static.total  # the convolutions cost what the static model's do


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, budget, expected",
    [("resnet50", None, 4.087e9), ("kw_resnet50", 1, 6.127e9), ("kw_resnet50", 4, 12.237e9)],
)
def test_resnet50_macs_match_the_paper_cost_model(name, budget, expected):
    model = kw.create_model(name, budget=budget) if budget else kw.create_model(name)
    assert abs(count_macs(model, (3, 224, 224)).total - expected) / expected < 0.01


def test_layer_macs_by_hand():
    conv = kw.KWConv2d(8, 16, 3, stride=2, padding=1, cell_num_ratio=2)
    macs = count_macs(conv, (8, 10, 10))
    weight = 16 * 8 * 9
    assert macs.layers == 5 * 5 * weight
    assert macs.assembly == conv.warehouse.num_cells * weight
    hidden, outputs = conv.attention.fc1.out_features, conv.attention.fc2.out_features
    assert macs.attention == 8 * hidden + hidden * outputs
    assert macs.total == macs.layers + macs.assembly + macs.attention
    linear = kw.KWLinear(12, 6)
    tokens = count_macs(linear, (4, 12))  # (1, 4, 12): four tokens
    assert tokens.layers == 4 * 12 * 6 and tokens.assembly == linear.warehouse.num_cells * 72


def test_static_modules_and_bad_shapes():
    model = nn.Sequential(nn.Conv1d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 6, 5))
    assert count_macs(model, (2, 8)).total == 6 * 4 * 3 + 24 * 5
    with pytest.raises(ValueError, match="shape of positive integers"):
        count_macs(model, (2, 0))


def test_a_sample_shape_a_batched_shape_or_an_example_tensor():
    model = kw.create_model("kw_resnet18", budget=1, small_input=True, num_classes=10)
    per_sample = count_macs(model, (3, 16, 16))
    assert count_macs(model, (1, 3, 16, 16)) == per_sample == count_macs(model, (5, 3, 16, 16))
    assert (
        count_macs(model, torch.randn(2, 3, 16, 16))
        == per_sample
        == count_macs(model, torch.randn(3, 16, 16))
    )
    with pytest.raises(ValueError, match=r"first convolution \(conv1, 2-d\) takes samples of 3 dimensions"):
        count_macs(model, (1, 1, 3, 16, 16))
    with pytest.raises(ValueError, match="example tensor"):
        count_macs(model, "3x16x16")
