"""The ``triton`` path: a KernelWarehouse convolution whose per-sample weights never reach memory.

Imported only when the path runs (it imports Triton). Three kernels, each an implicit-GEMM
convolution over one sample at a time, with the weight tile it multiplies assembled in registers
from the mixture weights and the warehouse cells (:func:`_weight_tile`) right before use:

``_forward_kernel``
    a program per (tile of output positions, tile of output channels within a group, sample):
    ``out[b] = W_b * x[b]``, reducing over kernel positions and input channels of the group.
``_input_grad_kernel``
    the same on the transposed problem, a program per (tile of input positions, tile of input
    channels, sample): ``grad_x[b] = W_b^T * grad[b]``; each input position gathers the output
    positions its kernel offsets reach. Input positions are tiled by phase (position mod stride),
    so a strided convolution skips the kernel offsets that reach no output of the tile.
``_weight_grad_kernel``
    per-sample weight gradients ``dW_b = grad[b] x[b]^T`` (reduced over output positions), written
    in cell order for a chunk of samples at a time; two products per chunk then turn them into the
    mixture and cell gradients (:func:`.recompute.cells_gradients`), as the ``grouped`` path does.

Supported: 2-d and 1-d convolutions of any stride, padding, dilation and groups (not depthwise,
which the other paths serve), and linear layers (a 1x1 convolution over the tokens). The kernels
take any strides; :func:`triton_conv` hands them 2-d inputs channels-last. Products run in the
input's dtype (autocast's where it is on;
fp32 with TF32 where ``torch.backends.cudnn.allow_tf32`` allows it, as PyTorch's convolutions do)
with fp32 accumulation; the assembly runs in fp32. Under ``TRITON_INTERPRET=1`` the kernels run on
CPU tensors (how the tests check them without a GPU).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import tuning
from .per_sample import ConvGeometry, batch_chunks
from .recompute import cells_gradients


@triton.jit
def _weight_tile(
    mix_ptr,
    cells_ptr,
    cells,
    oc,
    ci,
    kpos,
    mask,
    first_oc,
    first_ci,
    ONE_CELL: tl.constexpr,
):
    """One sample's W[oc, ci, kpos] for the (broadcast) index tiles ``oc`` (output channel of the
    layer) and ``ci`` (input channel within its group) at kernel position ``kpos``, in fp32 and 0
    where masked: its cell's mixture weights (``mix_ptr``: the sample's (m, n) rows) times the
    cells (``cells``: their :class:`_Cells`; element [j, o, i, t] at
    ``j * cells.stride_cell + o * cells.stride_out + i * cells.k + t``). With ``ONE_CELL`` the tile
    lies in the cell of its first element (``first_oc``, ``first_ci``): one mixture weight per
    warehouse cell instead of one per element."""
    within = (oc % cells.c_out) * cells.stride_out + (ci % cells.c_in) * cells.k + kpos % cells.k
    tile = tl.zeros(within.shape, tl.float32)
    if ONE_CELL:
        cell = (
            (kpos // cells.k) * cells.out_blocks + first_oc // cells.c_out
        ) * cells.in_blocks + first_ci // cells.c_in
        mix_row = mix_ptr + cell * cells.num
        for j in range(cells.num):
            a = tl.load(mix_row + j).to(tl.float32)
            tile += a * tl.load(cells_ptr + j * cells.stride_cell + within, mask=mask, other=0.0).to(
                tl.float32
            )
    else:
        cell = ((kpos // cells.k) * cells.out_blocks + oc // cells.c_out) * cells.in_blocks + ci // cells.c_in
        mix_rows = mix_ptr + cell * cells.num
        for j in range(cells.num):
            a = tl.load(mix_rows + j, mask=mask, other=0.0).to(tl.float32)
            tile += a * tl.load(cells_ptr + j * cells.stride_cell + within, mask=mask, other=0.0).to(
                tl.float32
            )
    return tile


@triton.jit
def _input_position(conv, oh, ow, kpos, pos_ok, KERNEL: tl.constexpr):
    """The input position (ih, iw) that output position (oh, ow) reads at kernel offset ``kpos``, and
    where that lies inside the input (and ``pos_ok``)."""
    ih = oh * conv.stride_h - conv.pad_h + (kpos // KERNEL[1]) * conv.dil_h
    iw = ow * conv.stride_w - conv.pad_w + (kpos % KERNEL[1]) * conv.dil_w
    return ih, iw, pos_ok & (ih >= 0) & (ih < conv.height) & (iw >= 0) & (iw < conv.width)


@triton.jit
def _program(TILES):
    """This program's sample (grid axis 2) and, along axis 1, which runs over ``TILES`` tiles of
    each group of channels, its group and tile."""
    return tl.program_id(2).to(tl.int64), tl.program_id(1) // TILES, tl.program_id(1) % TILES


@triton.jit
def _load_channels(rows, channel_stride, c0, channels, row_ok, WIDTH: tl.constexpr):
    """Channels ``c0`` to ``c0 + WIDTH`` of a tile of rows of a (B, C, H, W) tensor (``rows``: the
    pointers to their channel 0), 0 in the rows not ``row_ok`` and past ``channels``; and those
    channels' indices and which lie below ``channels``."""
    c = c0 + tl.arange(0, WIDTH)
    c_ok = c < channels
    tile = tl.load(
        rows[:, None] + c[None, :].to(tl.int64) * channel_stride,
        mask=row_ok[:, None] & c_ok[None, :],
        other=0.0,
    )
    return tile, c, c_ok


@triton.jit
def _store_tile(ptr, strides, sample, channel, h, w, acc, mask):
    """``acc`` (positions by channels, in fp32) into a (B, C, H, W) tensor at sample ``sample``,
    channels ``channel`` and positions (``h``, ``w``), in the tensor's dtype, where ``mask``."""
    at = (
        ptr
        + sample * strides.b
        + (channel.to(tl.int64) * strides.c)[None, :]
        + (h.to(tl.int64) * strides.h + w.to(tl.int64) * strides.w)[:, None]
    )
    tl.store(at, acc.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(
    x_ptr,
    out_ptr,
    mix_ptr,
    cells_ptr,
    cells,
    conv,
    x_strides,
    out_strides,
    TILES_N,
    KERNEL: tl.constexpr,
    TILE: tl.constexpr,
    ONE_CELL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``out[b] = W_b * x[b]`` for a :class:`_Tile` of output positions by output channels; ``cells``
    is a :class:`_Cells`, ``conv`` a :class:`_Conv`, the strides :class:`_Strides`, ``KERNEL``
    the kernel size (k_h, k_w)."""
    sample, group, tile = _program(TILES_N)
    pos = tl.program_id(0) * TILE.m + tl.arange(0, TILE.m)
    oh, ow = pos // conv.out_width, pos % conv.out_width
    pos_ok = pos < conv.out_height * conv.out_width
    first_oc = group * conv.c_out + tile * TILE.n
    oc_local = tile * TILE.n + tl.arange(0, TILE.n)
    oc = group * conv.c_out + oc_local
    oc_ok = oc_local < conv.c_out
    x_sample = x_ptr + sample * x_strides.b + (group * conv.c_in).to(tl.int64) * x_strides.c
    mix = mix_ptr + sample * cells.m * cells.num
    acc = tl.zeros((TILE.m, TILE.n), tl.float32)
    for kpos in range(KERNEL[0] * KERNEL[1]):
        ih, iw, inside = _input_position(conv, oh, ow, kpos, pos_ok, KERNEL)
        rows = x_sample + ih.to(tl.int64) * x_strides.h + iw.to(tl.int64) * x_strides.w
        for c0 in range(0, conv.c_in, TILE.k):
            xt, ci, ci_ok = _load_channels(rows, x_strides.c, c0, conv.c_in, inside, TILE.k)
            mask = ci_ok[:, None] & oc_ok[None, :]
            wt = _weight_tile(
                mix, cells_ptr, cells, oc[None, :], ci[:, None], kpos, mask, first_oc, c0, ONE_CELL
            )
            acc = tl.dot(xt, wt.to(xt.dtype), acc, input_precision=PRECISION)
    _store_tile(out_ptr, out_strides, sample, oc, oh, ow, acc, pos_ok[:, None] & oc_ok[None, :])


@triton.jit
def _input_grad_kernel(
    grad_ptr,
    gx_ptr,
    mix_ptr,
    cells_ptr,
    cells,
    conv,
    grad_strides,
    x_strides,
    TILES_N,
    TILES_M,
    KERNEL: tl.constexpr,
    TILE: tl.constexpr,
    ONE_CELL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``grad_x[b] = W_b^T * grad[b]`` for a tile of input positions (of one phase) by input
    channels; the arguments as :func:`_forward_kernel`'s."""
    sample, group, tile = _program(TILES_N)
    # input positions of one phase (ih mod stride, iw mod stride): a kernel offset reaches all of
    # them or none, so a strided convolution skips the offsets that reach none
    phase = tl.program_id(0) // TILES_M
    phase_h, phase_w = phase // conv.stride_w, phase % conv.stride_w
    rows_h, rows_w = tl.cdiv(conv.height, conv.stride_h), tl.cdiv(conv.width, conv.stride_w)
    pos = (tl.program_id(0) % TILES_M) * TILE.m + tl.arange(0, TILE.m)
    ih, iw = phase_h + (pos // rows_w) * conv.stride_h, phase_w + (pos % rows_w) * conv.stride_w
    pos_ok = (pos < rows_h * rows_w) & (ih < conv.height) & (iw < conv.width)
    first_ci = tile * TILE.n
    ci = first_ci + tl.arange(0, TILE.n)
    ci_ok = ci < conv.c_in
    grad_sample = grad_ptr + sample * grad_strides.b + (group * conv.c_out).to(tl.int64) * grad_strides.c
    mix = mix_ptr + sample * cells.m * cells.num
    acc = tl.zeros((TILE.m, TILE.n), tl.float32)
    for kpos in range(KERNEL[0] * KERNEL[1]):
        # the output position that reads input (ih, iw) at this kernel offset, where there is one
        shift_h = conv.pad_h - (kpos // KERNEL[1]) * conv.dil_h
        shift_w = conv.pad_w - (kpos % KERNEL[1]) * conv.dil_w
        if ((phase_h + shift_h) % conv.stride_h == 0) & ((phase_w + shift_w) % conv.stride_w == 0):
            th, tw = ih + shift_h, iw + shift_w
            oh, ow = th // conv.stride_h, tw // conv.stride_w
            reached = pos_ok & (th >= 0) & (tw >= 0) & (oh < conv.out_height) & (ow < conv.out_width)
            rows = grad_sample + oh.to(tl.int64) * grad_strides.h + ow.to(tl.int64) * grad_strides.w
            for c0 in range(0, conv.c_out, TILE.k):
                gt, oc_local, oc_ok = _load_channels(rows, grad_strides.c, c0, conv.c_out, reached, TILE.k)
                oc = group * conv.c_out + oc_local
                mask = oc_ok[:, None] & ci_ok[None, :]
                first_oc = group * conv.c_out + c0
                wt = _weight_tile(
                    mix, cells_ptr, cells, oc[:, None], ci[None, :], kpos, mask, first_oc, first_ci, ONE_CELL
                )
                acc = tl.dot(gt, wt.to(gt.dtype), acc, input_precision=PRECISION)
    _store_tile(
        gx_ptr, x_strides, sample, group * conv.c_in + ci, ih, iw, acc, pos_ok[:, None] & ci_ok[None, :]
    )


@triton.jit
def _weight_grad_kernel(
    x_ptr,
    grad_ptr,
    gw_ptr,
    cells,
    conv,
    x_strides,
    grad_strides,
    TILES_CI,
    TILES_OC,
    KERNEL: tl.constexpr,
    TILE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dW_b = grad[b] x[b]^T`` at one kernel position for a tile of input by output channels,
    written in cell order; the arguments as :func:`_forward_kernel`'s."""
    sample, group, tile = _program(TILES_OC)
    kpos = tl.program_id(0) // TILES_CI
    ci = (tl.program_id(0) % TILES_CI) * TILE.m + tl.arange(0, TILE.m)
    ci_ok = ci < conv.c_in
    oc_local = tile * TILE.n + tl.arange(0, TILE.n)
    oc_ok = oc_local < conv.c_out
    oc = group * conv.c_out + oc_local
    x_rows = x_ptr + sample * x_strides.b + ((group * conv.c_in + ci).to(tl.int64) * x_strides.c)[:, None]
    grad_cols = grad_ptr + sample * grad_strides.b + (oc.to(tl.int64) * grad_strides.c)[None, :]
    acc = tl.zeros((TILE.m, TILE.n), tl.float32)
    for p0 in range(0, conv.out_height * conv.out_width, TILE.k):
        pos = p0 + tl.arange(0, TILE.k)
        oh, ow = pos // conv.out_width, pos % conv.out_width
        pos_ok = pos < conv.out_height * conv.out_width
        ih, iw, inside = _input_position(conv, oh, ow, kpos, pos_ok, KERNEL)
        xt = tl.load(
            x_rows + (ih.to(tl.int64) * x_strides.h + iw.to(tl.int64) * x_strides.w)[None, :],
            mask=ci_ok[:, None] & inside[None, :],
            other=0.0,
        )
        gt = tl.load(
            grad_cols + (oh.to(tl.int64) * grad_strides.h + ow.to(tl.int64) * grad_strides.w)[:, None],
            mask=pos_ok[:, None] & oc_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(xt, gt, acc, input_precision=PRECISION)
    # dW split into cells: (sample, m, c_out, c_in, k_cell), what the mixture and cell gradients read
    cell_size = cells.c_out * cells.c_in * cells.k
    cell = ((kpos // cells.k) * cells.out_blocks + oc // cells.c_out)[None, :] * cells.in_blocks + (
        ci // cells.c_in
    )[:, None]
    within = ((oc % cells.c_out) * cells.c_in * cells.k)[None, :] + (
        (ci % cells.c_in) * cells.k + kpos % cells.k
    )[:, None]
    gw = gw_ptr + sample * cells.m * cell_size + cell.to(tl.int64) * cell_size + within
    tl.store(gw, acc, mask=ci_ok[:, None] & oc_ok[None, :])


class _Plane(NamedTuple):
    """A layer call as the kernels see it: a 2-d convolution (1-d and linear layers get a trailing
    axis of size 1, a linear layer's tokens become the rows)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


def _plane(geo: ConvGeometry) -> _Plane:
    if geo.dims == 2:
        return _Plane(tuple(geo.weight_shape[2:]), geo.stride, geo.padding, geo.dilation, geo.groups)
    if geo.dims == 1:
        return _Plane(
            (geo.weight_shape[2], 1),
            (geo.stride[0], 1),
            (geo.padding[0], 0),
            (geo.dilation[0], 1),
            geo.groups,
        )
    return _Plane((1, 1), (1, 1), (0, 0), (1, 1), 1)


def _as_4d(t: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """A view of a layer's input (or output, or their gradients) as (B, C, H, W)."""
    if geo.dims == 2:
        return t
    if geo.dims == 1:
        return t.unsqueeze(-1)
    return t.transpose(1, 2).unsqueeze(-1)  # (B, T, C) -> (B, C, T, 1)


def _from_4d(t: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    if geo.dims == 2:
        return t
    if geo.dims == 1:
        return t.squeeze(-1)
    return t.squeeze(-1).transpose(1, 2)


class _Conv(NamedTuple):
    """What the kernels take of a layer call (:class:`_Plane`) on one sample: input and output size,
    output and input channels per group, stride, padding and dilation."""

    height: int
    width: int
    out_height: int
    out_width: int
    c_out: int
    c_in: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dil_h: int
    dil_w: int

    @classmethod
    def of(cls, plane: _Plane, x4: torch.Tensor, geo: ConvGeometry) -> _Conv:
        """The call of ``plane`` on ``x4``, the layer's input as (B, C, H, W)."""
        size = tuple(
            (x4.shape[2 + i] + 2 * plane.padding[i] - plane.dilation[i] * (plane.kernel[i] - 1) - 1)
            // plane.stride[i]
            + 1
            for i in range(2)
        )
        channels = (geo.weight_shape[0] // plane.groups, geo.weight_shape[1])
        return cls(*x4.shape[2:], *size, *channels, *plane.stride, *plane.padding, *plane.dilation)


class _Cells(NamedTuple):
    """The cells as the kernels index them: ``num`` cells of ``c_out`` x ``c_in`` x ``k`` elements, a
    cell and an output channel of a cell ``stride_cell`` and ``stride_out`` elements apart; a layer
    weight is ``m`` of them, ``out_blocks`` x ``in_blocks`` per block of kernel positions."""

    num: int
    c_out: int
    c_in: int
    k: int
    out_blocks: int
    in_blocks: int
    m: int
    stride_cell: int
    stride_out: int

    @classmethod
    def of(cls, cells: torch.Tensor, geo: ConvGeometry) -> _Cells:
        num, c_out, c_in = cells.shape[:3]
        k, (_, out_blocks, in_blocks) = math.prod(cells.shape[3:]), geo.grid
        return cls(num, c_out, c_in, k, out_blocks, in_blocks, math.prod(geo.grid), *cells.stride()[:2])


class _Warehouse(NamedTuple):
    """The warehouse as the kernels read it: the mixture weights (B, m, n), contiguous, and the
    cells as (n, c_out, c_in * k_cell) with the last dimension contiguous."""

    mixture: torch.Tensor
    cells: torch.Tensor
    layout: _Cells

    @classmethod
    def of(cls, mixture: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry) -> _Warehouse:
        flat = cells.reshape(*cells.shape[:2], -1)
        if flat.stride(2) != 1:
            flat = flat.contiguous()
        layout = _Cells.of(cells, geo)._replace(stride_cell=flat.stride(0), stride_out=flat.stride(1))
        return cls(mixture.contiguous(), flat, layout)

    def one_cell(self, plane: _Plane, weight_shape: tuple[int, ...], tile_out: int, tile_in: int) -> bool:
        """Whether every tile of ``tile_out`` output channels by ``tile_in`` input channels lies in
        one cell (tiles start at multiples of their size within a group)."""
        c_out_group, c_in_group = weight_shape[0] // plane.groups, weight_shape[1]
        return (
            self.layout.c_out % tile_out == 0
            and c_out_group % tile_out == 0
            and self.layout.c_in % tile_in == 0
            and c_in_group % tile_in == 0
        )


class _Tile(NamedTuple):
    """The part of its product a kernel's program computes: ``m`` x ``n`` outputs, reducing over
    ``k`` terms at a time (positions by output channels over input channels for the forward kernel,
    positions by input channels over output channels for the input gradient, input by output
    channels over positions for the weight gradient)."""

    m: int
    n: int
    k: int


class _Strides(NamedTuple):
    """The strides of a (B, C, H, W) tensor, as the kernels take them."""

    b: int
    c: int
    h: int
    w: int


def _block(size: int, most: int) -> int:
    """A tile edge for ``size`` elements: a power of two from 16 (the least a matrix product takes)
    to ``most``."""
    return min(most, max(16, triton.next_power_of_2(size)))


def _tile(positions: int, channels: int, reduction: int) -> _Tile:
    """The tile of the forward and input-gradient kernels for ``positions`` by ``channels`` outputs
    reducing over ``reduction`` terms (see :func:`_block`)."""
    return _Tile(
        _block(positions, tuning.TRITON_BLOCK_POSITIONS),
        _block(channels, tuning.TRITON_BLOCK_CHANNELS),
        _block(reduction, tuning.TRITON_BLOCK_REDUCTION),
    )


def _precision(dtype: torch.dtype) -> str:
    allow_tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return "tf32" if allow_tf32 else "ieee"


def _launch(
    kernel, grid: tuple[int, int, int], plane: _Plane, tile: _Tile, dtype: torch.dtype, *args, **constants
) -> None:
    """``kernel`` on ``grid`` for a call of ``plane``, a ``tile`` per program, its products in ``dtype``."""
    kernel[grid](
        *args,
        KERNEL=plane.kernel,
        TILE=tile,
        PRECISION=_precision(dtype),
        num_warps=tuning.TRITON_WARPS,
        **constants,
    )


def _like_input(
    x4: torch.Tensor, batch: int, channels: int, size: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """An empty (B, C, H, W) tensor laid out as ``x4``: channels last where its channels are."""
    if x4.stride(1) == 1 and x4.shape[1] > 1:
        return torch.empty(batch, *size, channels, device=x4.device, dtype=dtype).permute(0, 3, 1, 2)
    return torch.empty(batch, channels, *size, device=x4.device, dtype=dtype)


def forward(x: torch.Tensor, mixture: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """The layer's output without bias, in x's dtype: ``_forward_kernel``."""
    plane, x4, warehouse = _plane(geo), _as_4d(x, geo), _Warehouse.of(mixture, cells, geo)
    conv, batch = _Conv.of(plane, x4, geo), x4.shape[0]
    size = (conv.out_height, conv.out_width)
    out = _like_input(x4, batch, geo.weight_shape[0], size, x.dtype)
    tile = _tile(size[0] * size[1], conv.c_out, conv.c_in)
    tiles_n = triton.cdiv(conv.c_out, tile.n)
    grid = (triton.cdiv(size[0] * size[1], tile.m), plane.groups * tiles_n, batch)
    one_cell = warehouse.one_cell(plane, geo.weight_shape, tile.n, tile.k)
    io = (x4, out, *warehouse, conv, _Strides(*x4.stride()), _Strides(*out.stride()))
    _launch(_forward_kernel, grid, plane, tile, x.dtype, *io, tiles_n, ONE_CELL=one_cell)
    return _from_4d(out, geo)


def input_grad(
    grad: torch.Tensor, mixture: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry, x: torch.Tensor
) -> torch.Tensor:
    """The gradient with respect to x (shaped and laid out as x): ``_input_grad_kernel``."""
    plane, x4, g4, warehouse = (
        _plane(geo),
        _as_4d(x, geo),
        _as_4d(grad, geo),
        _Warehouse.of(mixture, cells, geo),
    )
    conv, gx = _Conv.of(plane, x4, geo), torch.empty_like(x)
    gx4 = _as_4d(gx, geo)
    # input positions by phase (position mod stride): per phase at most this many
    positions = triton.cdiv(conv.height, conv.stride_h) * triton.cdiv(conv.width, conv.stride_w)
    tile = _tile(positions, conv.c_in, conv.c_out)
    tiles_n, tiles_m = triton.cdiv(conv.c_in, tile.n), triton.cdiv(positions, tile.m)
    grid = (conv.stride_h * conv.stride_w * tiles_m, plane.groups * tiles_n, x4.shape[0])
    one_cell = warehouse.one_cell(plane, geo.weight_shape, tile.k, tile.n)
    io = (g4, gx4, *warehouse, conv, _Strides(*g4.stride()), _Strides(*gx4.stride()))
    _launch(_input_grad_kernel, grid, plane, tile, grad.dtype, *io, tiles_n, tiles_m, ONE_CELL=one_cell)
    return gx


def weight_grad(x: torch.Tensor, grad: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """Per-sample weight gradients split into cells, (B, m, cell elements), in fp32:
    ``_weight_grad_kernel``."""
    plane, x4, g4 = _plane(geo), _as_4d(x, geo), _as_4d(grad, geo)
    conv, layout = _Conv.of(plane, x4, geo), _Cells.of(cells, geo)
    gw = torch.empty(x4.shape[0], layout.m, cells[0].numel(), device=x.device, dtype=torch.float32)
    tile = _Tile(
        _block(conv.c_in, tuning.TRITON_BLOCK_CHANNELS),
        _block(conv.c_out, tuning.TRITON_BLOCK_CHANNELS),
        _block(conv.out_height * conv.out_width, tuning.TRITON_BLOCK_REDUCTION),
    )
    tiles_ci, tiles_oc = triton.cdiv(conv.c_in, tile.m), triton.cdiv(conv.c_out, tile.n)
    grid = (plane.kernel[0] * plane.kernel[1] * tiles_ci, plane.groups * tiles_oc, x4.shape[0])
    io = (x4, g4, gw, layout, conv, _Strides(*x4.stride()), _Strides(*g4.stride()))
    _launch(_weight_grad_kernel, grid, plane, tile, x.dtype, *io, tiles_ci, tiles_oc)
    return gw


class FusedConv(torch.autograd.Function):
    """The ``triton`` path as an autograd function: keeps x, the mixture weights and the cells;
    backward assembles the weight tiles again for the input gradient, and takes the mixture and
    cell gradients from per-sample weight gradients a chunk of samples at a time
    (:data:`kernelwarehouse.tuning.CHUNK_ELEMENTS`), so nothing of size B |W| is kept."""

    forward = staticmethod(forward)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        x, mixture, cells, ctx.geo = inputs
        ctx.save_for_backward(x, mixture, cells)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, mixture, cells = ctx.saved_tensors
        geo: ConvGeometry = ctx.geo
        grad = grad.to(x.dtype)
        grad_x = input_grad(grad, mixture, cells, geo, x) if ctx.needs_input_grad[0] else None
        grad_mixture = grad_cells = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            mix32 = mixture.float()
            cells2d = cells.float().reshape(cells.shape[0], -1)
            grad_mixture = torch.empty_like(mix32)
            grad_cells = torch.zeros_like(cells2d)
            for part in batch_chunks(x.shape[0], math.prod(geo.weight_shape)):
                per_cell = weight_grad(x[part], grad[part], cells, geo)
                cells_gradients(per_cell, mix32[part], cells2d, grad_mixture[part], grad_cells)
            grad_mixture = grad_mixture.to(mixture.dtype)
            grad_cells = grad_cells.reshape(cells.shape).to(cells.dtype)
        return grad_x, grad_mixture, grad_cells, None


def triton_conv(
    x: torch.Tensor, mixture: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry
) -> torch.Tensor:
    """A KernelWarehouse convolution (without bias) on the fused kernels; x in autocast's dtype where
    autocast is on, the mixture weights and cells as they are (the assembly runs in fp32).

    A 2-d input is taken channels-last (copied once if it is not; the output is channels-last too,
    so the layers after it keep that layout): the kernels read a tile of input channels as one
    contiguous run per position, which the compiled loads vectorize, where rows of an NCHW input
    would be read element by element."""
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    x = x.to(dtype)
    if geo.dims == 2:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(kind, enabled=False):
        return FusedConv.apply(x, mixture, cells, geo)
