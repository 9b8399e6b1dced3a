"""CondConv2d, DynamicConv2d and ODConv2d against slow per-sample references, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernelwarehouse as kw
from kernelwarehouse.baselines import (
    CondConv2d,
    DynamicConv2d,
    ODConv2d,
    baseline_temperature,
    set_baseline_temperature,
)

DTYPE = torch.float64
# (in, out, kernel, stride, padding, dilation, groups)
SHAPES = [
    (6, 10, 3, 1, 1, 1, 1),
    (6, 10, 3, 2, 1, 1, 1),
    (6, 8, 1, 1, 0, 1, 1),
    (8, 8, 3, 1, 2, 2, 8),  # depthwise, dilated
    (6, 4, 3, 2, 1, 1, 2),  # grouped
    (6, 10, (3, 1), 1, (1, 0), 1, 1),
]


def randomise(layer: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for name, b in layer.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
    return layer


def per_sample(layer, x: torch.Tensor, kernel_and_bias) -> torch.Tensor:
    """Loop over samples: build sample b's weight and bias, then one F.conv2d."""
    outs = []
    for b in range(x.shape[0]):
        weight, bias = kernel_and_bias(b)
        outs.append(
            F.conv2d(x[b : b + 1], weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        )
    return torch.cat(outs)


def reference_condconv(layer: CondConv2d, x: torch.Tensor) -> torch.Tensor:
    pooled = x.mean(dim=(2, 3))

    def kernel(b):
        r = torch.sigmoid(pooled[b] @ layer.routing.weight.T + layer.routing.bias)
        weight = sum(r[k] * layer.weight[k] for k in range(layer.num_kernels))
        bias = None if layer.bias is None else sum(r[k] * layer.bias[k] for k in range(layer.num_kernels))
        return weight, bias

    return per_sample(layer, x, kernel)


def reference_dyconv(layer: DynamicConv2d, x: torch.Tensor) -> torch.Tensor:
    pooled = x.mean(dim=(2, 3))

    def kernel(b):
        h = torch.relu(pooled[b] @ layer.fc1.weight.T + layer.fc1.bias)
        pi = torch.softmax((h @ layer.fc2.weight.T + layer.fc2.bias) / layer.temperature, dim=0)
        weight = sum(pi[k] * layer.weight[k] for k in range(layer.num_kernels))
        bias = None if layer.bias is None else sum(pi[k] * layer.bias[k] for k in range(layer.num_kernels))
        return weight, bias

    return per_sample(layer, x, kernel)


def reference_odconv(layer: ODConv2d, x: torch.Tensor) -> torch.Tensor:
    """Eq. 2 of the ODConv paper with every attention folded into the kernel."""
    att, t = layer.attention, layer.temperature
    bn = att.bn
    h = F.batch_norm(
        x.mean(dim=(2, 3)) @ att.fc.weight.T,
        bn.running_mean,
        bn.running_var,
        bn.weight,
        bn.bias,
        layer.training,
        0.0,
        bn.eps,
    )
    h = torch.relu(h)
    c_out, c_in_group = layer.weight.shape[1:3]
    # the input channel that weight[:, o, j] reads
    channel_of = torch.arange(c_out)[:, None] // (c_out // layer.groups) * c_in_group + torch.arange(
        c_in_group
    )

    def kernel(b):
        a_c = torch.sigmoid((h[b] @ att.channel_fc.weight.T + att.channel_fc.bias) / t)[channel_of]
        a_f = (
            torch.sigmoid((h[b] @ att.filter_fc.weight.T + att.filter_fc.bias) / t)
            if att.filter_fc
            else torch.ones(c_out, dtype=x.dtype)
        )
        a_s = (
            torch.sigmoid((h[b] @ att.spatial_fc.weight.T + att.spatial_fc.bias) / t).reshape(
                layer.kernel_size
            )
            if att.spatial_fc
            else torch.ones(layer.kernel_size, dtype=x.dtype)
        )
        a_w = (
            torch.softmax((h[b] @ att.kernel_fc.weight.T + att.kernel_fc.bias) / t, dim=0)
            if att.kernel_fc
            else torch.ones(1, dtype=x.dtype)
        )
        weight = sum(
            a_w[k] * a_f[:, None, None, None] * a_c[:, :, None, None] * a_s * layer.weight[k]
            for k in range(layer.num_kernels)
        )
        bias = None if layer.bias is None else a_w @ layer.bias
        return weight, bias

    return per_sample(layer, x, kernel)


def check_against_reference(layer: nn.Module, reference, x: torch.Tensor) -> None:
    x = x.clone().requires_grad_(True)
    params = [x] + list(layer.parameters())
    out = layer(x)
    expected = reference(layer, x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), params)
    expected_grads = torch.autograd.grad((expected * probe).sum(), params)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def make_input(c: int, seed: int, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, c, 7, 9, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_condconv_matches_reference(shape, bias):
    layer = randomise(CondConv2d(*shape, bias=bias, num_experts=3).to(DTYPE), 1)
    check_against_reference(layer, reference_condconv, make_input(shape[0], 2))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_dyconv_matches_reference(shape, bias):
    layer = randomise(DynamicConv2d(*shape, bias=bias, num_kernels=4, temperature=3.0).to(DTYPE), 3)
    check_against_reference(layer, reference_dyconv, make_input(shape[0], 4))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel_num", [1, 4])
def test_odconv_matches_reference(shape, kernel_num):
    layer = randomise(
        ODConv2d(*shape, bias=False, kernel_num=kernel_num, temperature=2.0).to(DTYPE), 5
    ).eval()
    check_against_reference(layer, reference_odconv, make_input(shape[0], 6))


@pytest.mark.parametrize("kernel_num", [1, 3])
def test_odconv_training_mode_and_bias_match_reference(kernel_num):
    layer = randomise(ODConv2d(6, 10, 3, 1, 1, kernel_num=kernel_num, bias=True).to(DTYPE), 7).train()
    x = make_input(6, 8, batch=4)
    with torch.no_grad():  # batch statistics: the same for both, running stats updated once each
        torch.testing.assert_close(layer(x), reference_odconv(layer, x), rtol=1e-10, atol=1e-10)


def test_batch_of_one_equals_each_sample_of_a_batch():
    for layer in (
        CondConv2d(6, 10, 3, padding=1),
        DynamicConv2d(6, 10, 3, padding=1),
        ODConv2d(6, 10, 3, padding=1),
    ):
        layer = randomise(layer.to(DTYPE), 9).eval()
        x = make_input(6, 10)
        torch.testing.assert_close(layer(x)[1:2], layer(x[1:2]), rtol=1e-12, atol=1e-12)


def test_odconv_skips_trivial_attentions():
    assert ODConv2d(16, 16, 3, groups=16, kernel_num=1).attention.filter_fc is None
    pointwise = ODConv2d(16, 32, 1, kernel_num=1).attention
    assert pointwise.spatial_fc is None and pointwise.kernel_fc is None and pointwise.filter_fc is not None
    full = ODConv2d(160, 32, 3, kernel_num=4).attention
    assert (full.fc.out_features, full.spatial_fc.out_features, full.kernel_fc.out_features) == (16, 9, 4)
    assert ODConv2d(512, 32, 3).attention.fc.out_features == 32  # 512 / 16


def test_parameter_counts_of_single_layers():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # K kernels, bias per kernel, routing C_in x K + K
    assert count(CondConv2d(64, 32, 3, num_experts=8)) == 8 * 32 * 64 * 9 + 8 * 32 + 64 * 8 + 8
    # hidden 64 / 4 = 16: fc1 64*16+16, fc2 16*4+4
    assert count(DynamicConv2d(64, 32, 3, bias=False)) == 4 * 32 * 64 * 9 + 64 * 16 + 16 + 16 * 4 + 4
    # hidden 16: fc 64*16, bn 2*16, channel 16*64+64, filter 16*32+32, spatial 16*9+9, kernel 16*4+4
    attention = 64 * 16 + 32 + 16 * 64 + 64 + 16 * 32 + 32 + 16 * 9 + 9 + 16 * 4 + 4
    assert count(ODConv2d(64, 32, 3, bias=False)) == 4 * 32 * 64 * 9 + attention


def test_temperature_is_separate_from_kernelwarehouse_tau():
    model = nn.Sequential(
        DynamicConv2d(4, 4, 3), ODConv2d(4, 4, 3), CondConv2d(4, 4, 3), kw.KWConv2d(4, 4, 3)
    )
    assert set_baseline_temperature(model, 30) == 2
    assert kw.set_temperature(model, 0.5) == 1
    assert model[0].temperature == model[1].attention.temperature == 30.0
    with pytest.raises(ValueError, match="temperature"):
        set_baseline_temperature(model, 0)
    assert baseline_temperature(0, 100) == 30.0
    assert baseline_temperature(50, 100) == pytest.approx(15.5)
    assert baseline_temperature(100, 100) == baseline_temperature(500, 100) == 1.0


def test_high_temperature_flattens_dyconv_attention():
    layer = randomise(DynamicConv2d(6, 4, 3), 11)
    x = torch.randn(2, 6, 5, 5)
    spread = lambda: layer.kernel_attention(x).std(dim=1).max()  # noqa: E731
    sharp = spread()
    layer.temperature = 1000.0
    assert spread() < sharp / 100


@pytest.mark.parametrize("cls", [CondConv2d, DynamicConv2d, ODConv2d])
def test_bad_arguments_raise(cls):
    with pytest.raises(ValueError, match="divisible by groups"):
        cls(6, 10, 3, groups=4)
    with pytest.raises(ValueError, match="kernels"):
        cls(6, 10, 3, 1, 0, 1, 1, True, 0)
    with pytest.raises(ValueError, match="expects input"):
        cls(6, 10, 3)(torch.randn(2, 5, 8, 8))


def test_odconv_batchnorm_batch_of_one_raises_in_training():
    with pytest.raises(ValueError, match="batch of 1"):
        ODConv2d(6, 10, 3).train()(torch.randn(1, 6, 8, 8))


def test_baseline_layers_show_their_arguments():
    import inspect

    from kernelwarehouse.baselines import CondConv2d, DynamicConv2d, ODConv2d

    conv = list(inspect.signature(torch.nn.Conv2d).parameters)[:8]
    for layer, own in [
        (CondConv2d, ["num_experts"]),
        (DynamicConv2d, ["num_kernels", "reduction", "min_hidden", "temperature"]),
        (ODConv2d, ["kernel_num", "reduction", "min_hidden", "temperature"]),
    ]:
        assert list(inspect.signature(layer).parameters) == conv + own
