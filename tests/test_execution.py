"""Every execution path computes what the reference path (B assembled weights, groups = B) computes."""

from __future__ import annotations

import glob

import pytest
import torch
import torch.nn as nn

import kernelwarehouse as kw
import kernelwarehouse.core.paths as paths
from kernelwarehouse import tuning
from kernelwarehouse.core.execution import (
    ConvGeometry,
    PATHS,
    choose_path,
    execution_path,
    get_execution_path,
    kw_conv,
    set_execution_path,
)
from kernelwarehouse.core.mix import mix_supported
from kernelwarehouse.core.paths import LayerCall

FAST_PATHS = (
    "grouped",
    "unfold",
    "mix",
    "loop",
    "loop:slices",
    "loop:sample",
    "loop:mix",
    "patches",
    "patches:slices",
    "patches:mix",
    "fused",
    "fused:tiles",
    "fused:slices",
    "fused:mix",
    "grouped@torch",
    "loop:sample@torch",
    "auto",
)

# (layer class, constructor kwargs, input shape)
CASES = {
    "conv2d": (
        kw.KWConv2d,
        dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, cell_num_ratio=2),
        (3, 8, 9, 9),
    ),
    "conv2d_strided_dilated": (
        kw.KWConv2d,
        dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=2, dilation=2, bias=False),
        (3, 8, 11, 10),
    ),
    "conv2d_blocks": (
        kw.KWConv2d,
        dict(
            in_channels=8,
            out_channels=16,
            kernel_size=3,
            padding=1,
            cell_inplane_ratio=0.5,
            cell_outplane_ratio=0.5,
            cell_num_ratio=0.5,
        ),
        (2, 8, 7, 7),
    ),
    "conv2d_whole_kernel_cells": (
        kw.KWConv2d,
        dict(
            in_channels=8, out_channels=8, kernel_size=3, padding=1, spatial_partition=False, cell_num_ratio=4
        ),
        (2, 8, 6, 6),
    ),
    "conv2d_groups": (
        kw.KWConv2d,
        dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, groups=4),
        (2, 8, 6, 6),
    ),
    "conv2d_depthwise": (
        kw.KWConv2d,
        dict(in_channels=8, out_channels=8, kernel_size=5, padding="same", groups=8),
        (3, 8, 7, 7),
    ),
    "conv2d_pointwise_strided": (
        kw.KWConv2d,
        dict(in_channels=8, out_channels=16, kernel_size=1, stride=2),
        (4, 8, 7, 7),
    ),
    "conv2d_reflect_same_even": (
        kw.KWConv2d,
        dict(in_channels=4, out_channels=6, kernel_size=4, padding="same", padding_mode="reflect"),
        (2, 4, 8, 8),
    ),
    "conv2d_batch1": (
        kw.KWConv2d,
        dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, norm="layer"),
        (1, 8, 6, 6),
    ),
    "conv1d": (
        kw.KWConv1d,
        dict(in_channels=6, out_channels=10, kernel_size=5, stride=2, padding=2),
        (3, 6, 17),
    ),
    "conv1d_batch1": (
        kw.KWConv1d,
        dict(in_channels=6, out_channels=6, kernel_size=3, norm="layer"),
        (1, 6, 9),
    ),
    "conv3d": (
        kw.KWConv3d,
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, cell_num_ratio=2),
        (2, 4, 5, 5, 4),
    ),
    "conv3d_groups_batch1": (
        kw.KWConv3d,
        dict(in_channels=4, out_channels=4, kernel_size=(1, 3, 3), padding=(0, 1, 1), groups=2, norm="layer"),
        (1, 4, 3, 5, 5),
    ),
    "linear_tokens": (kw.KWLinear, dict(in_features=12, out_features=20, cell_inplane_ratio=0.5), (3, 5, 12)),
    "linear": (kw.KWLinear, dict(in_features=16, out_features=10, bias=False), (4, 16)),
    "linear_batch1": (kw.KWLinear, dict(in_features=16, out_features=10, norm="layer"), (1, 16)),
}


def run(layer: nn.Module, x: torch.Tensor, path: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    with execution_path(path):
        out = layer(x)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape))
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    return out.detach(), grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_paths_equal_reference_forward_and_backward(case):
    torch.manual_seed(0)
    cls, kwargs, shape = CASES[case]
    layer = cls(**kwargs).double().train()
    kw.set_temperature(layer, 0.3)
    with torch.no_grad():  # a warehouse and attention far from their initialisation
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x = torch.randn(shape, dtype=torch.float64)
    ref_out, ref_grads = run(layer, x, "reference")
    assert all(g is not None and g.abs().sum() > 0 for g in ref_grads)
    for path in FAST_PATHS:
        out, grads = run(layer, x, path)
        assert relative(out, ref_out) < 1e-5, path
        for got, want in zip(grads, ref_grads):
            assert relative(got, want) < 1e-5, path


@pytest.mark.parametrize("case", ["conv2d", "conv2d_depthwise", "linear_tokens"])
def test_paths_equal_reference_in_float32_inference(case):
    torch.manual_seed(1)
    cls, kwargs, shape = CASES[case]
    layer = cls(**kwargs).eval()
    kw.set_temperature(layer, 0.5)
    x = torch.randn(shape)
    with torch.no_grad(), execution_path("reference"):
        ref = layer(x)
    for path in FAST_PATHS:
        with torch.no_grad(), execution_path(path):
            assert relative(layer(x), ref) < 1e-5, path


def saved_numels(layer: nn.Module, x: torch.Tensor, path: str) -> list[int]:
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), execution_path(path):
        layer(x)
    return sizes


def test_grouped_backward_keeps_no_per_sample_weights():
    layer = kw.KWConv2d(16, 16, 3, padding=1).train()
    batch = 8
    x = torch.randn(batch, 16, 4, 4, requires_grad=True)
    weights = batch * 16 * 16 * 9
    reference = saved_numels(layer, x, "reference")
    lean = saved_numels(layer, x, "grouped")
    assert max(reference) >= weights  # the reference keeps the B assembled weights
    assert max(lean) < weights  # the recomputing backward does not
    assert sum(lean) <= sum(reference) - weights


def test_choose_path_by_shape():
    last = ConvGeometry((9, 1, 1), (512, 512, 3, 3), (1, 1), (1, 1), (1, 1), 1)  # ResNet18, last stage
    cells = (27, 512, 512, 1, 1)
    point = ConvGeometry((1, 1, 1), (64, 32, 1, 1), (2, 2), (0, 0), (1, 1), 1)
    depthwise = ConvGeometry((9, 1, 1), (32, 1, 3, 3), (1, 1), (1, 1), (1, 1), 32)
    # CPU: one sample at a time, except pointwise layers of a batch (a batched matrix product)
    # and depthwise ones
    for batch, size in [(16, 49), (1, 49), (16, 56 * 56), (1, 56 * 56)]:
        assert choose_path(last, cells, batch, size) == "loop"
    assert choose_path(depthwise, (12, 32, 1, 1, 1), 4, 4) == "grouped"  # one input per group
    assert choose_path(point, (10, 64, 32, 1, 1), 8, 100) == "unfold"
    assert choose_path(point, (10, 64, 32, 1, 1), 1, 100 * 100) == "loop"
    # too little work per sample for a call per sample: as off CPU
    small = ConvGeometry((9, 1, 1), (8, 8, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    assert choose_path(small, (56, 8, 8, 1, 1), 64, 4) == "mix"
    assert choose_path(small, (56, 8, 8, 1, 1), 64, 64) == "grouped"
    assert choose_path(point, (10, 64, 32, 1, 1), 1, 100) == "grouped"
    # elsewhere (a GPU): mixing beats assembling where the map is small against the warehouse
    assert choose_path(last, cells, 16, 49, "cuda") == "mix"
    assert choose_path(last, cells, 1, 49, "cuda") == "grouped"  # one sample: assembling writes little
    assert choose_path(last, cells, 16, 56 * 56, "cuda") == "grouped"
    assert choose_path(point, (10, 64, 32, 1, 1), 8, 100, "cuda") == "unfold"
    assert choose_path(point, (10, 64, 32, 1, 1), 1, 100, "cuda") == "grouped"
    assert not mix_supported(depthwise, (12, 32, 1, 1, 1))
    assert choose_path(depthwise, (12, 32, 1, 1, 1), 4, 4, "cuda") == "grouped"


def test_execution_path_setting():
    assert get_execution_path() == "auto"
    with execution_path("mix"):
        assert get_execution_path() == "mix"
    with execution_path("loop:slices"):
        assert get_execution_path() == "loop:slices"
    assert get_execution_path() == "auto"
    assert set(PATHS) == {
        "auto",
        "reference",
        "grouped",
        "unfold",
        "conv",
        "mix",
        "loop",
        "patches",
        "fused",
        "triton",
    }
    with pytest.raises(ValueError, match="execution path must be 'auto', one of"):
        set_execution_path("fast")
    with pytest.raises(ValueError, match="loop:slices"):
        set_execution_path("loop:fast")
    with pytest.raises(ValueError):
        set_execution_path("grouped:slices")  # only loop, patches and fused have backward forms
    with execution_path("loop:slices@torch"):  # PyTorch's products in place of the native kernels
        assert get_execution_path() == "loop:slices@torch"
    with pytest.raises(ValueError):
        set_execution_path("loop@fast")


def test_kw_conv_matches_layer_forward():
    layer = kw.KWConv2d(6, 6, 3, padding=1).eval()
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        attention = layer.mixture(x.mean(dim=(2, 3)))
        direct = kw_conv(x, attention, layer.warehouse.weight, layer.bias, layer._geometry, "reference")
        assert torch.equal(direct, layer(x)) or relative(layer(x), direct) < 1e-6
        weights = layer.assemble(x.mean(dim=(2, 3)))
        static = torch.stack(
            [nn.functional.conv2d(x[b : b + 1], weights[b], layer.bias, padding=1)[0] for b in range(2)]
        )
        assert relative(direct, static) < 1e-5


FIXTURES = sorted(glob.glob("/work/shared/fixtures/official/*.pt"))


@pytest.mark.skipif(not FIXTURES, reason="reference fixtures not available")
@pytest.mark.parametrize("path", FAST_PATHS)
def test_reference_fixtures_reproduce_on_every_path(path):
    from kernelwarehouse.compat import load_reference_state_dict, model_from_reference_config

    for fixture in FIXTURES:
        data = torch.load(fixture, weights_only=False)
        model = model_from_reference_config(data["config"])
        load_reference_state_dict(model, data["state_dict"])
        model = model.double().eval()
        for tau, logits in data["logits"].items():
            kw.set_temperature(model, tau)
            with torch.no_grad(), execution_path(path):
                out = model(data["input"].double())
            assert relative(out, logits) < 1e-6, (fixture, tau)


@pytest.mark.parametrize("case", ["conv2d", "conv2d_groups", "linear_tokens"])
def test_recomputing_path_in_chunks_of_the_batch(monkeypatch, case):
    import kernelwarehouse.core.per_sample as per_sample

    torch.manual_seed(2)
    cls, kwargs, shape = CASES[case]
    layer = cls(**kwargs).double().train()
    x = torch.randn(shape, dtype=torch.float64)
    ref_out, ref_grads = run(layer, x, "reference")
    weight_numel = torch.Size(layer.weight_shape).numel()
    monkeypatch.setattr(tuning, "CHUNK_ELEMENTS", weight_numel)  # one sample per chunk
    assert len(per_sample.batch_chunks(shape[0], weight_numel)) > 1
    for path in ("grouped", "unfold"):
        out, grads = run(layer, x, path)
        assert relative(out, ref_out) < 1e-5
        assert all(relative(g, r) < 1e-5 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("case", ["conv2d", "conv2d_blocks", "conv3d", "conv2d_whole_kernel_cells"])
def test_loop_path_in_slices_of_output_channels(monkeypatch, case):
    torch.manual_seed(5)
    cls, kwargs, shape = CASES[case]
    kwargs = {**kwargs, "out_channels": 64}
    layer = cls(**kwargs).double().train()
    x = torch.randn(shape, dtype=torch.float64)
    ref_out, ref_grads = run(layer, x, "reference")
    monkeypatch.setattr(tuning, "LOOP_SLICE_ELEMENTS", 1)  # slices of 16 output channels
    for path in ("loop", "loop:sample", "loop:slices", "patches", "patches:sample"):
        out, grads = run(layer, x, path)
        assert relative(out, ref_out) < 1e-5
        assert all(relative(g, r) < 1e-5 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("chunked", [False, True])
def test_loop_path_backward_in_mix_form(monkeypatch, chunked):
    """``loop:mix`` runs the loop forward and the mix form's backward, which builds no weight; the
    rule takes it where the map is small against the warehouse and slices are not taken."""
    import kernelwarehouse.core.recompute as recompute

    torch.manual_seed(6)
    layer = (
        kw.KWConv2d(
            16, 32, 3, stride=2, padding=1, cell_num_ratio=4, cell_outplane_ratio=0.5, cell_inplane_ratio=0.5
        )
        .double()
        .train()
    )
    x = torch.randn(4, 16, 5, 5, dtype=torch.float64)
    call = LayerCall.of(
        x.clone().requires_grad_(),
        torch.zeros(4, 1, 1, requires_grad=True),
        layer.warehouse.weight,
        layer._geometry,
    )
    assert paths.mix_is_cheap(layer._geometry, layer.warehouse.weight.shape, 9)
    ref_out, ref_grads = run(layer, x, "reference")
    if chunked:
        monkeypatch.setattr(tuning, "CHUNK_ELEMENTS", 1)  # one sample per chunk
    monkeypatch.setattr(tuning, "SLICED_MAX_POSITIONS", 0)
    assert paths.loop_backward_rule(call) == "mix"
    calls = []
    monkeypatch.setattr(recompute, "loop_backward", lambda *a, **k: calls.append(a))
    for path in ("loop", "loop:mix"):
        out, grads = run(layer, x, path)
        assert not calls
        assert relative(out, ref_out) < 1e-5
        assert all(relative(g, r) < 1e-5 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("case", ["conv2d", "conv2d_blocks", "conv2d_whole_kernel_cells", "conv1d", "conv3d"])
@pytest.mark.parametrize("by_slices", [False, True])
def test_loop_backward_by_slices_or_by_sample(monkeypatch, case, by_slices):
    """The loop path's backward by slices of output channels and sample by sample both give the
    reference gradients; the rule takes slices on small maps without groups."""
    import kernelwarehouse.core.loop as loop

    torch.manual_seed(8)
    cls, kwargs, shape = CASES[case]
    layer = cls(**{**kwargs, "out_channels": 32}).double().train()
    x = torch.randn(shape, dtype=torch.float64)
    ref_out, ref_grads = run(layer, x, "reference")
    monkeypatch.setattr(tuning, "LOOP_SLICE_ELEMENTS", 1)  # several slices of 16 output channels
    monkeypatch.setattr(tuning, "MIX_ADVANTAGE", 0)  # the rule never takes the mix form
    monkeypatch.setattr(tuning, "SLICED_MAX_POSITIONS", 10**6 if by_slices else 0)
    sliced = []
    original = loop._backward_by_slices
    monkeypatch.setattr(loop, "_backward_by_slices", lambda *a: sliced.append(1) or original(*a))
    for path in ("loop", "loop:slices" if by_slices else "loop:sample"):
        sliced.clear()
        out, grads = run(layer, x, path)
        assert bool(sliced) == by_slices
        assert relative(out, ref_out) < 1e-5
        assert all(relative(g, r) < 1e-5 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("path", ["reference", "grouped", "unfold", "mix", "loop", "patches"])
def test_autocast_bfloat16_training_step(path):
    torch.manual_seed(3)
    model = nn.Sequential(
        kw.KWConv2d(4, 8, 3, padding=1, norm="layer"),
        nn.ReLU(),
        kw.KWConv2d(8, 8, 1, norm="layer", cell_num_ratio=2),
    ).train()
    x = torch.randn(3, 4, 5, 5)
    model(x).square().mean().backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16), execution_path(path):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    for p, want in zip(model.parameters(), full):
        assert p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()
        # bfloat16 keeps 8 bits: the direction of each gradient survives, not its digits
        assert nn.functional.cosine_similarity(p.grad.flatten(), want.flatten(), dim=0) > 0.9


@pytest.mark.parametrize("batch", [1, 3])
def test_conv_per_sample_matches_a_loop_and_traces_batch_free(batch):
    from kernelwarehouse.core.execution import conv_per_sample

    torch.manual_seed(4)
    x, weight, bias = torch.randn(batch, 6, 7, 7), torch.randn(batch, 4, 3, 3, 3), torch.randn(4)
    loop = torch.cat([nn.functional.conv2d(x[b : b + 1], weight[b], bias, 2, 1, 1, 2) for b in range(batch)])
    assert relative(conv_per_sample(x, weight, bias, (2, 2), (1, 1), (1, 1), 2), loop) < 1e-5
    traced = torch.jit.trace(
        lambda a, w: conv_per_sample(a, w, bias, (2, 2), (1, 1), (1, 1), 2),
        (torch.randn(2, 6, 7, 7), torch.randn(2, 4, 3, 3, 3)),
        check_trace=False,
    )
    assert relative(traced(x, weight), loop) < 1e-5


FUSED_CASES = [
    case
    for case, (cls, kwargs, _) in CASES.items()
    if cls is not kw.KWLinear and kwargs.get("groups", 1) == 1
] + ["wide_channels"]
WIDE = (
    kw.KWConv2d,
    dict(in_channels=24, out_channels=80, kernel_size=3, stride=2, padding=1, cell_outplane_ratio=0.5),
    (7, 24, 9, 8),
)


@pytest.mark.skipif(not kw.native.available(), reason="the fused path runs on the native kernels")
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_path_in_float32_equals_reference_in_float64(case):
    """The fused path on the native kernels (float32 only), forward and every backward form, against the
    reference path in float64; the output comes channels-last."""
    torch.manual_seed(3)
    cls, kwargs, shape = WIDE if case == "wide_channels" else CASES[case]
    layer = cls(**kwargs).train()
    kw.set_temperature(layer, 0.3)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    reference = cls(**kwargs).double().train()
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(shape)
    want_out, want_grads = run(reference, x.double(), "reference")
    for path in ("fused", "fused:tiles", "fused:slices", "fused:sample", "fused:mix"):
        layer.load_state_dict(reference.state_dict())  # the attention's running statistics as before
        out, grads = run(layer, x, path)
        assert layer.last_path.startswith("fused")  # a form the layer lacks: the rule's
        assert relative(out.double(), want_out) < 1e-5, path
        for got, want in zip(grads, want_grads):
            assert relative(got.double(), want) < 1e-4, path
    layer.load_state_dict(reference.state_dict())
    layer.eval(), reference.eval()
    with torch.no_grad(), execution_path("fused"):
        out = layer(x)
    assert layer.last_path == "fused"
    with torch.no_grad(), execution_path("reference"):
        assert relative(out.double(), reference(x.double())) < 1e-5


@pytest.mark.skipif(not kw.native.available(), reason="the fused path runs on the native kernels")
def test_fused_path_follows_every_change_of_the_warehouse():
    """The fused kernel reads the warehouse as it is at each call: after an optimizer step, after a
    loaded state dict."""
    torch.manual_seed(4)
    layer = kw.KWConv2d(16, 32, 3, padding=1).eval()
    x = torch.randn(3, 16, 8, 8)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(2):
        with torch.no_grad(), execution_path("fused"):
            got = layer(x)
        with torch.no_grad(), execution_path("reference"):
            assert relative(got, layer(x)) < 1e-5
        with execution_path("fused:tiles"):
            layer.train()(x).square().mean().backward()
        optimizer.step()
        layer.eval()
    state = {k: torch.randn_like(v) if "warehouse" in k else v for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)
    with torch.no_grad(), execution_path("fused"):
        got = layer(x)
    with torch.no_grad(), execution_path("reference"):
        assert relative(got, layer(x)) < 1e-5
