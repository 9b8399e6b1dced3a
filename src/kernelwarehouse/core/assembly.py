"""Assembly: per-sample weights from mixture weights and cells, and back.

Cells of a layer are numbered (spatial block, output block, input block); cell (s, o, i) fills
``W[o*c_out:(o+1)*c_out, i*c_in:(i+1)*c_in]`` at kernel position s (row-major), or the whole
kernel when cells are not split spatially.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch

from .. import native
from .plan import CellGrid


def assemble_weights(
    mixture: torch.Tensor, cells: torch.Tensor, grid: CellGrid, weight_shape: Sequence[int]
) -> torch.Tensor:
    """(B, m, n) mixture weights and (n, c_out, c_in, *k_cell) cells -> (B, *weight_shape)."""
    batch, num, c_out, dims = mixture.shape[0], cells.shape[0], cells.shape[1], cells.dim() - 3
    kernel = range(6, 6 + dims)
    if torch.compiler.is_compiling():  # the compiler cannot batch the shared rows over a free batch
        return assemble_by_product(mixture, cells, list(grid), list(weight_shape))
    # one product per output channel of the cells, which is how the warehouse is stored
    mixed = mix_rows(mixture.reshape(-1, num), cells_by_output(cells))
    mixed = mixed.reshape(c_out, batch, *grid, *cells.shape[2:])
    # (c_out, B, spatial, out, in, c_in, *k) -> (B, out, c_out, in, c_in, spatial, *k)
    return mixed.permute(1, 3, 0, 4, 5, 2, *kernel).reshape(batch, *weight_shape)


def assemble_by_product(
    mixture: torch.Tensor, cells: torch.Tensor, grid: List[int], weight_shape: List[int]
) -> torch.Tensor:
    """:func:`assemble_weights` as one matrix product over all cells and a transposition into the
    weight's order: the form for compiled graphs, TorchScript-compatible (the scripted layers run it)."""
    batch, num = mixture.shape[0], cells.shape[0]
    mixed = torch.matmul(mixture.reshape(-1, num), cells.reshape(num, -1))
    mixed = mixed.reshape([batch] + grid + list(cells.shape[1:]))
    kernel = [6 + d for d in range(cells.dim() - 3)]
    # (B, spatial, out, in, c_out, c_in, *k) -> (B, out, c_out, in, c_in, spatial, *k)
    return mixed.permute([0, 2, 4, 3, 5, 1] + kernel).reshape([batch] + weight_shape)


def split_into_cells(weight: torch.Tensor, grid: CellGrid, cell_shape: Sequence[int]) -> torch.Tensor:
    """The inverse of assembly: (*weight_shape) -> (m, *cell_shape), or with a leading batch
    dimension (B, *weight_shape) -> (B, m, *cell_shape)."""
    dims = len(cell_shape) - 2
    batch = weight.shape[: weight.dim() - dims - 2]
    lead = len(batch)
    spatial, out_blocks, in_blocks = grid
    c_out, c_in = cell_shape[:2]
    # (out, c_out, in, c_in, spatial, *k) -> (spatial, out, in, c_out, c_in, *k)
    cells = weight.reshape(*batch, out_blocks, c_out, in_blocks, c_in, spatial, *cell_shape[2:])
    order = [lead + d for d in (4, 0, 2, 1, 3)] + [lead + 5 + d for d in range(dims)]
    cells = cells.permute(*range(lead), *order)
    return cells.reshape(*batch, spatial * out_blocks * in_blocks, *cell_shape)


def cells_by_output(cells: torch.Tensor) -> torch.Tensor:
    """(n, c_out, c_in, *k_cell) cells as a (c_out, n, c_in * k_cell) view: one matrix per output channel."""
    return cells.reshape(cells.shape[0], cells.shape[1], -1).transpose(0, 1)


def mix_rows(
    rows: torch.Tensor, by_output: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False
) -> torch.Tensor:
    """Mixture rows (r, n) applied to each output channel's cells (c, n, d): (c, r, d), written to
    ``out`` when given, or added to it with ``accumulate``. By the native kernel where it applies
    (:mod:`kernelwarehouse.native`), which serves any product with a small inner dimension n."""
    channels, num, length = by_output.shape
    if (
        native.applies(rows, by_output, *([] if out is None else [out]))  # first: it is False under tracing
        and native.worthwhile(channels * rows.shape[0] * num * length, length)
    ):
        return native.mix_rows(rows, by_output, out, accumulate)
    rows = rows.expand(by_output.shape[0], -1, -1)
    if accumulate:
        return out.baddbmm_(rows, by_output)
    return torch.bmm(rows, by_output, out=out)


def rows_gradient(grad: torch.Tensor, by_output: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`mix_rows` with respect to its rows, from its output's (c, r, d): (r, n)."""
    if native.applies(grad, by_output) and native.worthwhile(
        grad.shape[:2].numel() * by_output[0].numel(), grad.shape[2]
    ):
        return native.rows_gradient(grad, by_output)
    return torch.bmm(grad, by_output.transpose(1, 2)).sum(0)


def assemble_in_weight_order(
    mixture: torch.Tensor,
    cells: torch.Tensor,
    grid: Sequence[int],
    weight_shape: Sequence[int],
    cells_by_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`assemble_weights` as one (broadcast) matrix product whose result is already in the
    weight's memory order, so that no weight-sized tensor is transposed: the form for exported
    graphs, where a transposition of every assembled weight costs more than the product itself.

    Cells that hold whole kernels (spatial blocks 1) are mixed as ``mixture @ cells``; cells of a
    kernel position each (cell kernel 1) as ``cells^T @ mixture^T`` with the kernel position as the
    product's last axis. The latter takes the cells as (c_out * c_in, n), :func:`cells_by_row`;
    ``cells_by_row`` passes it in (a graph builds it once per warehouse).
    """
    batch, num = mixture.shape[0], cells.shape[0]
    spatial, out_blocks, in_blocks = grid
    c_out, cell_kernel = cells.shape[1], math.prod(cells.shape[3:])
    if spatial == 1 and in_blocks == 1:  # (B, out, n) @ (n, c_out * c_in * k): (B, out, c_out, c_in, k)
        mixed = torch.matmul(mixture, cells.reshape(num, -1))
    elif spatial == 1:  # (B, out, 1, in, n) @ (c_out, n, c_in * k): (B, out, c_out, in, c_in * k)
        by_output = cells.reshape(num, c_out, -1).transpose(0, 1)
        mixed = torch.matmul(mixture.reshape(batch, out_blocks, 1, in_blocks, num), by_output)
    elif cell_kernel == 1:  # (c_out [, 1], c_in, n) @ (B, out [, 1, in], n, spatial)
        by_row = cells_by_row if cells_by_row is not None else cells_by_rows(cells)
        by_position = mixture.reshape(batch, spatial, out_blocks, in_blocks, num).permute(0, 2, 3, 4, 1)
        if in_blocks == 1:  # (c_out * c_in, n) @ (B, out, n, spatial): (B, out, c_out * c_in, spatial)
            mixed = torch.matmul(by_row, by_position.reshape(batch, out_blocks, num, spatial))
        else:  # (B, out, c_out, in, c_in, spatial)
            rows = by_row.reshape(c_out, 1, -1, num)
            mixed = torch.matmul(rows, by_position.reshape(batch, out_blocks, 1, in_blocks, num, spatial))
    else:
        return assemble_weights(mixture, cells, grid, weight_shape)
    return mixed.reshape(batch, *weight_shape)


def cells_by_rows(cells: torch.Tensor) -> torch.Tensor:
    """Cells of kernel 1 (n, c_out, c_in, 1...) as a (c_out * c_in, n) matrix."""
    return cells.reshape(cells.shape[0], -1).transpose(0, 1)
