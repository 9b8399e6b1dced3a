"""``torch.jit.script`` on KernelWarehouse layers and zoo models: a real TorchScript graph, equal to
eager, savable and loadable."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import kernelwarehouse as kw
from kernelwarehouse import KWConv1d, KWConv3d, KWLinear


def _round_trip(scripted: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert expected.abs().max() > 0  # a comparison of zeros would prove nothing
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial parameters and BatchNorm statistics, so that every part of the graph counts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.is_floating_point() and "temperature" not in name:
                values = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(values + 0.5 if "running_var" in name else (values - 0.5) * 0.2)


@pytest.mark.parametrize("name", ["kw_resnet18", "kw_mobilenetv2_100", "kw_convnext_tiny", "kw_deit_tiny"])
def test_zoo_model_scripts_equal_to_eager(name: str) -> None:
    torch.manual_seed(0)
    model = kw.create_model(name, small_input=True, num_classes=10).eval()
    _randomise(model)
    x = torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(model)
    assert "prim::PythonOp" not in str(scripted.inlined_graph)  # no call back into Python
    with torch.no_grad():
        expected = model(x)
        _assert_close(scripted(x), expected)
        _assert_close(scripted(x[:1]), expected[:1])  # the graph holds for any batch size


def test_scripted_model_saves_and_loads() -> None:
    torch.manual_seed(0)
    model = kw.create_model("kw_resnet18", small_input=True, num_classes=10).eval()
    _randomise(model)
    x = torch.randn(3, 3, 32, 32)
    loaded = _round_trip(torch.jit.script(model))
    with torch.no_grad():
        _assert_close(loaded(x), model(x))


@pytest.mark.parametrize(
    "layer, shape",
    [
        (lambda: KWConv1d(8, 16, 3, stride=2, padding=1, bias=True, cell_num_ratio=2), (2, 8, 12)),
        (lambda: KWConv1d(8, 16, 3, padding="same", padding_mode="reflect", cell_num_ratio=2), (2, 8, 9)),
        (lambda: KWConv3d(4, 8, 3, padding=1, groups=2, cell_num_ratio=2), (2, 4, 5, 6, 5)),
        (lambda: KWLinear(16, 24, cell_num_ratio=2), (2, 5, 16)),
        (lambda: KWLinear(16, 24, cell_num_ratio=2), (16,)),
    ],
)
def test_layer_scripts_equal_to_eager(layer, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    module = layer().eval()
    _randomise(module)
    x = torch.randn(shape)
    loaded = _round_trip(torch.jit.script(module))
    with torch.no_grad():
        _assert_close(loaded(x), module(x))


def test_folded_scale_scripts() -> None:
    """A layer with a BatchNorm folded in (``out_scale``) scripts with its scale."""
    torch.manual_seed(0)
    layer = kw.KWConv2d(8, 8, 3, padding=1, cell_num_ratio=2).eval()
    _randomise(layer)
    layer.out_scale = torch.rand(8) + 0.5
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        _assert_close(torch.jit.script(layer)(x), layer(x))


def test_scripted_layer_rejects_bad_input() -> None:
    scripted = torch.jit.script(kw.KWConv2d(8, 8, 3, cell_num_ratio=2).eval())
    with pytest.raises(Exception, match="expects a batched 4-d input with 8 channels"):
        scripted(torch.randn(2, 4, 6, 6))


def test_scripted_model_trains_like_eager() -> None:
    """In training mode the scripted graph runs the reference scheme under autograd: the same
    output and the same gradients as eager."""
    torch.manual_seed(0)
    model = kw.create_model("kw_resnet18", small_input=True, num_classes=10).train()
    _randomise(model)
    scripted = torch.jit.script(copy.deepcopy(model))
    x = torch.randn(4, 3, 16, 16)
    expected, actual = model(x), scripted(x)
    _assert_close(actual, expected)
    expected.square().sum().backward()
    actual.square().sum().backward()
    scripted_params = dict(scripted.named_parameters())
    for name, eager in model.named_parameters():
        scale = eager.grad.abs().max().item()
        torch.testing.assert_close(scripted_params[name].grad, eager.grad, rtol=1e-3, atol=1e-4 * scale)
