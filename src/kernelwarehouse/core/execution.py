"""Execution: assemble per-sample weights from mixture weights and a warehouse, then convolve.

Cells of a layer are numbered (spatial block, output block, input block); cell (s, o, i) fills
``W[o*c_out:(o+1)*c_out, i*c_in:(i+1)*c_in]`` at kernel position s (row-major), or the whole
kernel when cells are not split spatially.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def assemble_weights(attention: torch.Tensor, cells: torch.Tensor, grid: Sequence[int],
                     weight_shape: Sequence[int]) -> torch.Tensor:
    """(B, m, n) mixture weights and (n, c_out, c_in, *k_cell) cells -> (B, *weight_shape)."""
    batch, dims = attention.shape[0], cells.dim() - 3
    mixed = torch.matmul(attention, cells.reshape(cells.shape[0], -1))
    mixed = mixed.reshape(batch, *grid, *cells.shape[1:])
    # (B, spatial, out, in, c_out, c_in, *k) -> (B, out, c_out, in, c_in, spatial, *k)
    mixed = mixed.permute(0, 2, 4, 3, 5, 1, *range(6, 6 + dims))
    return mixed.reshape(batch, *weight_shape)


def conv_per_sample(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    stride: Sequence[int], padding: Sequence[int] | str, dilation: Sequence[int],
                    groups: int) -> torch.Tensor:
    """Convolve sample b of ``x`` with ``weight[b]`` (B, C_out, C_in/groups, *k) in one call."""
    conv: Callable = CONV[weight.dim() - 3]
    batch = x.shape[0]
    if batch == 1:
        return conv(x, weight[0], bias, stride, padding, dilation, groups)
    out = conv(x.reshape(1, -1, *x.shape[2:]), weight.reshape(-1, *weight.shape[2:]), None,
               stride, padding, dilation, groups * batch)
    out = out.reshape(batch, -1, *out.shape[2:])
    if bias is not None:
        out = out + bias.reshape(1, -1, *([1] * (out.dim() - 2)))
    return out


def linear_per_sample(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, C_in) with weight (B, C_out, C_in) -> (B, T, C_out)."""
    out = torch.bmm(x, weight.transpose(1, 2))
    return out if bias is None else out + bias


def split_into_cells(weight: torch.Tensor, grid: Sequence[int], cell_shape: Sequence[int]) -> torch.Tensor:
    """The inverse of assembly for one weight: (*weight_shape) -> (m, c_out, c_in, *k_cell)."""
    dims = len(cell_shape) - 2
    spatial, out_blocks, in_blocks = grid
    c_out, c_in = cell_shape[:2]
    # (out, c_out, in, c_in, spatial, *k) -> (spatial, out, in, c_out, c_in, *k)
    cells = weight.reshape(out_blocks, c_out, in_blocks, c_in, spatial, *cell_shape[2:])
    cells = cells.permute(4, 0, 2, 1, 3, *range(5, 5 + dims))
    return cells.reshape(spatial * out_blocks * in_blocks, *cell_shape)
