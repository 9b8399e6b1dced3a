"""The ``fused`` execution path (CPU): each sample's weight assembled a tile at a time in cache by the
native kernels and applied at once to the sample's input patches, so that no whole weight is ever
written to memory, and the warehouse is read once per call for the whole batch.

Per block of output channels, a slice of the warehouse (in a packed copy, :func:`packed_cells`) stays in
cache while the tiles of every sample and kernel position are mixed from it; each tile then meets the
sample's patches in registers (:func:`kernelwarehouse.native.fused_conv`). The output comes channels-last.
"""

from __future__ import annotations

import math

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .. import native, tuning
from .assembly import cells_by_output
from .loop import loop_conv
from .per_sample import ConvGeometry, patches

_packed: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # warehouse -> (its version, packed copy)


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


def packed_cells(cells: torch.Tensor) -> torch.Tensor:
    """The warehouse in the order the fused kernel reads it, built once per version of its values (an
    optimizer step or a load builds it again)."""
    key = (cells._version, cells.data_ptr(), tuning.FUSED_CHANNELS)
    cached = _packed.get(cells)
    if cached is not None and cached[0] == key:
        return cached[1]
    packed = native.pack_cells(cells_by_output(cells.detach()), tuning.FUSED_CHANNELS)
    _packed[cells] = (key, packed)
    return packed


def fused_conv(
    x: torch.Tensor, mixture: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry
) -> torch.Tensor:
    """The convolution of ``x`` with the weights assembled from ``mixture`` and ``cells``, without bias;
    where the native kernels do not apply (recording a gradient, ``native.enabled(False)``), the
    ``patches`` form of the ``loop`` path computes it."""
    if not native.applies(x, mixture, cells):
        return loop_conv(x, mixture, cells, geo, by_patches=True)
    spatial, out_blocks, in_blocks = geo.grid
    batch, num = mixture.shape[0], cells.shape[0]
    cols, size = patches(x, geo, kernel_first=spatial > 1)
    if cols.stride(2) != 1:
        cols = cols.contiguous()
    rows = mixture.reshape(batch, spatial, out_blocks, in_blocks, num).transpose(1, 2)
    rows = rows.reshape(batch, out_blocks, spatial * in_blocks, num)
    out = native.fused_conv(cols, rows, packed_cells(cells), cells.shape[1], tuning.FUSED_TILE_FLOATS)
    return out.reshape(batch, *size, -1).movedim(-1, 1)
