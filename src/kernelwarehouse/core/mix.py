"""The ``mix`` execution path: ``out_b = sum_j E_j (sum_s a_bsj x_b,s)``, the input mixed by the
mixture weights and then multiplied by the whole warehouse at once; no weight is ever assembled.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import tuning
from .per_sample import BackwardOperands, ConvGeometry, batch_chunks, shifted_views


def _mix_features(
    x: torch.Tensor, mixture: torch.Tensor, geo: ConvGeometry, cells_shape: Sequence[int]
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The shifted inputs mixed by the mixture weights, ``sum_s a_bsj x_b,s``, as channels-last features
    (B * out blocks, c_in * n, L, 1) for one pointwise convolution with the whole warehouse."""
    spatial, out_blocks, in_blocks = geo.grid
    num, c_in = cells_shape[0], cells_shape[2]
    batch = x.shape[0]
    cols, size = shifted_views(
        x, geo.weight_shape[2:], geo.stride, geo.padding, geo.dilation, channels_last=True
    )
    length = math.prod(size)
    # cols is (B, L, in block, c_in, spatial): make it (position, c_in) x (spatial, in block)
    cols = cols.reshape(batch, length, in_blocks, c_in, spatial)
    cols = cols.permute(0, 1, 3, 4, 2) if in_blocks > 1 else cols
    cols = cols.reshape(batch, length * c_in, spatial * in_blocks)
    mix = mixture.reshape(batch, spatial, out_blocks, in_blocks, num).permute(0, 1, 3, 2, 4)
    mixed = torch.matmul(cols, mix.reshape(batch, spatial * in_blocks, out_blocks * num))
    # (B, L, c_in, out block, n) -> (B * out blocks, L, c_in * n)
    mixed = mixed.reshape(batch, length, c_in, out_blocks, num)
    if out_blocks > 1:
        mixed = mixed.permute(0, 3, 1, 2, 4)
    return mixed.reshape(batch * out_blocks, length, 1, c_in * num).permute(0, 3, 1, 2), size


def _mix_weight(cells: torch.Tensor) -> torch.Tensor:
    """The warehouse as the (c_out, c_in * n, 1, 1) weight of :func:`_mix_features`' convolution."""
    num, c_out, c_in = cells.shape[:3]
    return cells.reshape(num, c_out, c_in).permute(1, 2, 0).reshape(c_out, c_in * num, 1, 1)


def mix_conv(x: torch.Tensor, mixture: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """``out_b = sum_j E_j (sum_s a_bsj x_b,s)``: mix shifted inputs, then one product with all cells,
    run as a pointwise convolution (on CPU the convolution library does it twice as fast as a
    matrix product)."""
    features, size = _mix_features(x, mixture, geo, cells.shape)
    weight = _mix_weight(cells)
    if torch.compiler.is_compiling():  # the compiler mistakes the strides of a width-1 channels-last map
        rows = features.permute(0, 2, 3, 1).reshape(-1, weight.shape[1])
        out = torch.matmul(rows, weight.flatten(1).t())
        out = out.reshape(features.shape[0], math.prod(size), weight.shape[0]).transpose(1, 2)
    else:
        out = F.conv2d(features, weight)
    return out.reshape(x.shape[0], geo.grid.out_blocks * weight.shape[0], *size)


def mix_backward(ops: BackwardOperands) -> torch.Tensor:
    """Backward of a KernelWarehouse convolution in the ``mix`` form, whichever path ran forward:
    the warehouse and mixed-input gradients come from one pointwise convolution backward, the rest
    by autograd through the cheap mixing; no per-sample weight is built. Works through the batch in
    chunks of :data:`kernelwarehouse.tuning.CHUNK_ELEMENTS` mixed features. Fills grad_x and
    grad_mixture, returns the cells' gradient."""
    x, mixture, cells, grad, geo, grad_x, grad_mixture = ops
    weight = _mix_weight(cells)
    grad_weight = torch.zeros_like(weight)
    per_sample = geo.grid.out_blocks * math.prod(grad.shape[2:]) * weight.shape[1]
    for part in batch_chunks(x.shape[0], per_sample):
        with torch.enable_grad():
            part_mixture = mixture[part].detach().requires_grad_()
            sample = x[part].detach().requires_grad_(grad_x is not None)
            features, _ = _mix_features(sample, part_mixture, geo, cells.shape)
        inputs = [part_mixture, sample] if grad_x is not None else [part_mixture]
        out_grad = grad[part].reshape(features.shape[0], weight.shape[0], -1, 1)
        grad_features, part_weight, _ = torch.ops.aten.convolution_backward(
            out_grad,
            features.detach(),
            weight,
            None,
            [1, 1],
            [0, 0],
            [1, 1],
            False,
            [0, 0],
            1,
            [True, True, False],
        )
        grad_weight += part_weight
        grads = torch.autograd.grad(features, inputs, grad_features)
        grad_mixture[part] = grads[0]
        if grad_x is not None:
            grad_x[part] = grads[1]
    num, c_out, c_in = cells.shape[:3]
    return grad_weight.reshape(c_out, c_in, num).permute(2, 0, 1).reshape(cells.shape)


def mix_is_cheap(
    geo: ConvGeometry, cells_shape: Sequence[int], out_size: int, advantage: float | None = None
) -> bool:
    """Whether ``mix`` spends at most ``advantage`` (default :data:`.tuning.MIX_ADVANTAGE`) times the
    multiply-adds of assembling: n L |W| / (spatial blocks * input blocks) against (n + L) |W| per
    sample."""
    advantage = tuning.MIX_ADVANTAGE if advantage is None else advantage
    num = cells_shape[0]
    spatial, _, in_blocks = geo.grid
    return mix_supported(geo, cells_shape) and num * out_size < advantage * spatial * in_blocks * (
        num + out_size
    )


def mix_supported(geo: ConvGeometry, cells_shape: Sequence[int]) -> bool:
    """Whether the ``mix`` path applies to a warehouse of ``cells_shape`` (n, c_out, c_in, *k_cell):
    a convolution with groups 1 and cells of kernel size 1."""
    return not geo.linear and geo.groups == 1 and all(k == 1 for k in cells_shape[3:])
