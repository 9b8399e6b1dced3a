"""torch.compile: no graph breaks in KernelWarehouse layers, one graph for every batch size and tau."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import kernelwarehouse as kw

dynamo = pytest.importorskip("torch._dynamo")


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        kw.KWConv2d(3, 8, 3, padding=1, norm="layer"),
        nn.ReLU(),
        kw.KWConv2d(8, 8, 1, stride=2, norm="layer", cell_num_ratio=4),  # pointwise
        kw.KWConv2d(8, 8, 3, padding=1, groups=8, norm="layer"),  # depthwise
        kw.KWConv2d(8, 8, 3, padding=1, norm="layer", cell_num_ratio=4),  # small map: mix
        nn.Flatten(2),
        kw.KWLinear(16, 4, norm="layer"),
    )


@pytest.fixture
def recompile_limit_one():
    config = dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    previous = getattr(config, name)
    setattr(config, name, 1)
    dynamo.reset()
    yield
    setattr(config, name, previous)
    dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_without_graph_breaks_or_recompiles(recompile_limit_one, backend):
    model = _small_model().eval()
    # inductor also specialises what the others leave symbolic (a grouped convolution's groups = B)
    compiled = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for batch, tau in ((2, 0.5), (3, 0.5), (5, 0.2), (1, 0.0)):
            kw.set_temperature(model, tau)
            x = torch.randn(batch, 3, 8, 8)
            dynamo.decorators.mark_unbacked(x, 0)  # batch 1 too: no 0/1 specialisation
            expected = model(x)
            got = compiled(x)
            assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4  # float32, fused
    # fullgraph=True raises on a graph break, the limit of 1 on any recompile


def test_compiled_training_step_matches_eager(recompile_limit_one):
    torch.manual_seed(0)
    model = nn.Sequential(
        kw.KWConv2d(3, 8, 3, padding=1, norm="layer", cell_num_ratio=2),
        nn.ReLU(),
        kw.KWConv2d(8, 4, 1, stride=2, norm="layer"),
    ).train()
    kw.set_temperature(model, 0.5)
    compiled = torch.compile(model, backend="aot_eager", dynamic=True, fullgraph=True)
    for batch in (4, 6):
        x = torch.randn(batch, 3, 6, 6)
        grads = []
        for module in (model, compiled):
            model.zero_grad()
            module(x).square().mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for eager, got in zip(*grads):
            assert ((got - eager).abs().max() / eager.abs().max().clamp_min(1e-12)).item() < 1e-4
