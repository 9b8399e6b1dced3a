"""ONNX export in each graph form (checked in onnxruntime), BatchNorm folding, TorchScript tracing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import kernelwarehouse as kw
from kernelwarehouse import tuning

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _randomize_batchnorms(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from the identity, so folding them shows."""
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            size = m.num_features
            m.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            m.bias.data.copy_(torch.rand(size, generator=generator) - 0.5)
    return model


def _model(name: str, budget: float) -> nn.Module:
    torch.manual_seed(0)
    model = kw.create_model(name, budget=budget, num_classes=10).eval()
    kw.set_temperature(model, 0.5)
    return _randomize_batchnorms(model)


def _check(session, model: nn.Module, batch: int, size: int = 32) -> None:
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4


def _session(path: str):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name, budget", [("kw_resnet18", 1), ("kw_mobilenetv2_100", 1)])
@pytest.mark.parametrize("form", ["loop", "unfold"])
def test_onnx_dynamic_batch_matches_pytorch(tmp_path, name, budget, form, monkeypatch):
    monkeypatch.setattr(tuning, "EXPORT_LOOP_CHUNK", 4)  # batch 5: one chunk of 4 and one single sample
    model = _model(name, budget)
    session = _session(kw.export_onnx(model, tmp_path / f"{name}.onnx", torch.randn(2, 3, 32, 32), form=form))
    for batch in (1, 5):
        _check(session, model, batch)


@pytest.mark.parametrize("name, budget", [("kw_resnet18", 1), ("kw_mobilenetv2_100", 1)])
@pytest.mark.parametrize("form, batch", [("grouped", 1), ("grouped", 3), ("loop", 3)])
def test_onnx_fixed_batch_matches_pytorch(tmp_path, name, budget, form, batch, monkeypatch):
    monkeypatch.setattr(tuning, "EXPORT_LOOP_CHUNK", 2)
    model = _model(name, budget)
    path = kw.export_onnx(
        model, tmp_path / "m.onnx", torch.randn(batch, 3, 32, 32), form=form, dynamic_batch=False
    )
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [batch, 3, 32, 32]
    _check(_session(path), model, batch)


def test_onnx_convnext_default_form_matches_pytorch(tmp_path):
    model = _model("kw_convnext_tiny", 1)
    session = _session(kw.export_onnx(model, tmp_path / "convnext.onnx", torch.randn(1, 3, 32, 32)))
    for batch in (1, 5):
        _check(session, model, batch)


def test_grouped_export_is_plain_convolutions_without_batchnorm(tmp_path):
    model = _model("kw_resnet18", 1)
    path = kw.export_onnx(
        model, tmp_path / "m.onnx", torch.randn(1, 3, 32, 32), form="grouped", dynamic_batch=False
    )
    graph = onnx.load(path).graph
    ops = [node.op_type for node in graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 20  # every convolution, static and KW, once
    groups = [
        a.i for node in graph.node if node.op_type == "Conv" for a in node.attribute if a.name == "group"
    ]
    assert all(g == 1 for g in groups)
    # each warehouse's cells are in the graph once, not once per layer that mixes them
    sizes = sorted(int(np.prod(t.dims)) for t in graph.initializer)
    cells = sum(m.weight.numel() for m in model.modules() if isinstance(m, kw.Warehouse))
    assert sum(sizes) < sum(p.numel() for p in model.parameters()) + cells
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the model itself is not folded


def test_export_rejects_bad_arguments(tmp_path):
    layer = kw.KWConv2d(3, 4, 3)
    with pytest.raises(TypeError, match="example_input"):
        kw.export_onnx(layer, tmp_path / "x.onnx", [1, 2, 3])
    with pytest.raises(ValueError, match="form must be"):
        kw.export_onnx(layer, tmp_path / "x.onnx", torch.randn(1, 3, 8, 8), form="scan")
    with pytest.raises(ValueError, match="dynamic_batch=False"):
        kw.export_onnx(layer, tmp_path / "x.onnx", torch.randn(1, 3, 8, 8), form="grouped")


class _Pairs(nn.Module):
    """A KW convolution + BN, a static convolution + BN, and a convolution whose output has a second use."""

    def __init__(self) -> None:
        super().__init__()
        self.kw_conv, self.kw_bn = kw.KWConv2d(3, 8, 3, padding=1, cell_num_ratio=2), nn.BatchNorm2d(8)
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.shared, self.shared_bn = kw.KWConv2d(8, 8, 1, cell_num_ratio=2), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.kw_bn(self.kw_conv(x)))
        x = torch.relu(self.bn(self.conv(x)))
        y = self.shared(x)
        return self.shared_bn(y) + y


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(kw.KWConv2d(3, 8, 3, cell_num_ratio=2), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # data-dependent control flow: no symbolic trace
            return x
        return self.body(x)


def test_fuse_for_inference_folds_batchnorms_exactly():
    model = _randomize_batchnorms(_Pairs()).eval()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
        assert kw.fuse_for_inference(model) is model
        got = model(x)
    assert isinstance(model.kw_bn, nn.Identity) and isinstance(model.bn, nn.Identity)
    assert isinstance(model.shared_bn, nn.BatchNorm2d) and model.shared.out_scale is None  # y is used twice
    assert model.kw_conv.out_scale is not None and model.kw_conv.out_scale.shape == (8,)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_fuse_for_inference_falls_back_to_sequential_order():
    model = _randomize_batchnorms(_Untraceable()).eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        expected = model(x)
        got = kw.fuse_for_inference(model)(x)
    assert isinstance(model.body[1], nn.Identity)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.parametrize("name, size", [("kw_resnet18", 32), ("kw_mobilenetv2_100", 64)])
def test_fuse_for_inference_keeps_model_outputs(name, size):
    model = _model(name, 1)
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        got = kw.fuse_for_inference(model)(x)
    assert batchnorms > 0 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_folded_scale_is_the_same_on_every_path():
    layer = kw.KWConv2d(8, 16, 3, padding=1, bias=False, cell_num_ratio=2).eval()
    x = torch.randn(3, 8, 9, 9)
    scale, shift = torch.rand(16) + 0.5, torch.randn(16)
    with torch.no_grad():
        expected = layer(x) * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    layer.out_scale, layer.bias = scale, nn.Parameter(shift)
    for path in ("grouped", "unfold", "loop", "mix", "patches"):
        with kw.execution_path(path), torch.no_grad():
            got = layer(x)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), path


def test_torchscript_trace_runs_at_any_batch_size(tmp_path):
    model = _model("kw_resnet18", 1)
    traced = kw.trace(model, torch.randn(2, 3, 32, 32))
    traced.save(str(tmp_path / "model.pt"))
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(x)
            got = loaded(x)
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.parametrize(
    "grid, weight_shape, cell_shape",
    [
        ((9, 2, 1), (16, 8, 3, 3), (10, 8, 8, 1, 1)),  # cells of a kernel position, output blocks
        ((9, 2, 3), (16, 24, 3, 3), (10, 8, 8, 1, 1)),  # ... and input blocks
        ((9, 3, 1), (12, 1, 3, 3), (6, 4, 1, 1, 1)),  # depthwise
        ((1, 3, 2), (24, 32, 1, 1), (7, 8, 16, 1, 1)),  # whole kernels, output and input blocks
        ((1, 4, 1), (32, 8, 1, 1), (7, 8, 8, 1, 1)),  # whole kernels, output blocks
        ((1, 2, 3), (16, 24, 3, 3), (20, 8, 8, 3, 3)),  # whole 3x3 kernels
    ],
)
def test_assembly_in_weight_order_equals_assembly(grid, weight_shape, cell_shape):
    from kernelwarehouse.core.assembly import assemble_in_weight_order, assemble_weights

    mixture = torch.randn(3, grid[0] * grid[1] * grid[2], cell_shape[0])
    cells = torch.randn(cell_shape)
    expected = assemble_weights(mixture, cells, grid, weight_shape)
    assert torch.allclose(assemble_in_weight_order(mixture, cells, grid, weight_shape), expected, atol=1e-5)
