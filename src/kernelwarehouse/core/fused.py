"""The ``fused`` execution path (CPU): each sample's weight assembled a tile at a time in cache by the
native kernels and applied at once to the sample's input patches, so that no whole weight is ever
written to memory, and the warehouse is read once per call for the whole batch.

Per block of output channels, a slice of the warehouse is gathered into a tile that stays in cache
while the weight tiles of every sample and kernel position are mixed from it; each tile then meets the
sample's patches in registers (:func:`kernelwarehouse.native.fused_conv`). The output comes channels-last.
"""

from __future__ import annotations

import math

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .. import native, tuning
from .assembly import cells_by_output
from .loop import block_rows, block_rows_to_mixture, loop_conv
from .per_sample import BackwardOperands, ConvGeometry, patches


def fused_supported(geo: ConvGeometry, cells_shape: tuple[int, ...], dtype: str, device: str) -> bool:
    """Where the path runs: float32 on a CPU with the native kernels, eager mode, convolutions without
    groups whose cells hold whole kernels or one kernel position each."""
    whole_kernels = geo.grid.spatial == 1 or math.prod(cells_shape[3:]) == 1
    return (
        device.startswith("cpu")
        and not device.endswith(":pytorch")
        and dtype == "float32"
        and not geo.linear
        and geo.groups == 1
        and whole_kernels
    )


_kept: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # warehouse -> (its version, a copy)


def kept_cells(cells: torch.Tensor) -> torch.Tensor:
    """The warehouse as (c_out, n, d) cells whose output channels are contiguous, from a copy kept
    while the warehouse's values stay the same (an optimizer step or a load makes a new one): the
    fused kernel gathers its tiles from it in runs of channels, not element by element. For
    inference, where a warehouse serves call after call; training reads the warehouse itself."""
    key = (cells._version, cells.data_ptr())
    kept = _kept.get(cells)
    if kept is None or kept[0] != key:
        by_output = cells_by_output(cells.detach())
        kept = _kept[cells] = (key, by_output.permute(1, 2, 0).contiguous())  # (n, d, c_out)
    return kept[1].permute(2, 0, 1)


def fused_conv(
    x: torch.Tensor, mixture: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry, keep: bool = False
) -> torch.Tensor:
    """The convolution of ``x`` with the weights assembled from ``mixture`` and ``cells``, without bias;
    where the native kernels do not apply (recording a gradient, ``native.enabled(False)``), the
    ``patches`` form of the ``loop`` path computes it. ``keep``: read the warehouse from
    :func:`kept_cells` (inference)."""
    if not native.applies(x, mixture, cells):
        return loop_conv(x, mixture, cells, geo, by_patches=True)
    cols, size = patches(x, geo, kernel_first=geo.grid.spatial > 1)
    rows = block_rows(mixture, geo)
    by_output = kept_cells(cells) if keep else cells_by_output(cells)
    out = native.fused_conv(cols, rows, by_output, tuning.FUSED_CHANNELS, tuning.FUSED_TILE_FLOATS)
    return out.reshape(x.shape[0], *size, -1).movedim(-1, 1)


def fused_backward(ops: BackwardOperands) -> torch.Tensor:
    """Backward of :func:`fused_conv` on the native kernels (callers check :func:`native.applies`);
    fills grad_x and grad_mixture, returns the cells' gradient. No weight or weight gradient is built
    whole: the input gradient is the fused convolution of the output's gradient with the transposed
    weights (a transposed view of the warehouse), the rest comes from tiles of the weight gradient
    (:func:`kernelwarehouse.native.fused_weight_grad`)."""
    x, mixture, cells, grad, geo, grad_x, grad_mixture = ops
    batch, by_output = x.shape[0], cells_by_output(cells)
    with torch.enable_grad():
        inputs = x.detach().requires_grad_(grad_x is not None)
        cols, _ = patches(inputs, geo, kernel_first=geo.grid.spatial > 1)
    rows = block_rows(mixture, geo)
    by_position = grad.reshape(batch, grad.shape[1], -1)  # (B, C_out, L)
    if grad_x is not None:
        channels_last = by_position.transpose(1, 2).contiguous()
        grad_cols = native.fused_conv(  # the roles of a cell's input and output channels swapped
            channels_last,
            rows.transpose(1, 2).contiguous(),
            by_output.permute(2, 1, 0),
            tuning.FUSED_CHANNELS,
            tuning.FUSED_TILE_FLOATS,
        )
        grad_x.copy_(torch.autograd.grad(cols, inputs, grad_cols)[0])
    grad_rows, grad_by_output = native.fused_weight_grad(
        cols.detach(), by_position, rows, by_output, tuning.FUSED_GRAD_CHANNELS, tuning.FUSED_GRAD_TILE_FLOATS
    )
    grad_mixture.copy_(block_rows_to_mixture(grad_rows, geo))
    return grad_by_output.transpose(0, 1).reshape(cells.shape)
