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
    oc,
    ci,
    kpos,
    mask,
    first_oc,
    first_ci,
    N_CELLS,
    C_OUT_CELL,
    C_IN_CELL,
    K_CELL,
    OUT_BLOCKS,
    IN_BLOCKS,
    SE_CELL,
    SE_OUT,
    ONE_CELL: tl.constexpr,
):
    """One sample's W[oc, ci, kpos] for the (broadcast) index tiles ``oc`` (output channel of the
    layer) and ``ci`` (input channel within its group) at kernel position ``kpos``, in fp32 and 0
    where masked: its cell's mixture weights (``mix_ptr``: the sample's (m, n) rows) times the
    cells (element [j, o, i, t] at ``j * SE_CELL + o * SE_OUT + i * K_CELL + t``). With
    ``ONE_CELL`` the tile lies in the cell of its first element (``first_oc``, ``first_ci``): one
    mixture weight per warehouse cell instead of one per element."""
    within = (oc % C_OUT_CELL) * SE_OUT + (ci % C_IN_CELL) * K_CELL + kpos % K_CELL
    tile = tl.zeros(within.shape, tl.float32)
    if ONE_CELL:
        cell = ((kpos // K_CELL) * OUT_BLOCKS + first_oc // C_OUT_CELL) * IN_BLOCKS + first_ci // C_IN_CELL
        mix_row = mix_ptr + cell * N_CELLS
        for j in range(N_CELLS):
            a = tl.load(mix_row + j).to(tl.float32)
            tile += a * tl.load(cells_ptr + j * SE_CELL + within, mask=mask, other=0.0).to(tl.float32)
    else:
        cell = ((kpos // K_CELL) * OUT_BLOCKS + oc // C_OUT_CELL) * IN_BLOCKS + ci // C_IN_CELL
        mix_rows = mix_ptr + cell * N_CELLS
        for j in range(N_CELLS):
            a = tl.load(mix_rows + j, mask=mask, other=0.0).to(tl.float32)
            tile += a * tl.load(cells_ptr + j * SE_CELL + within, mask=mask, other=0.0).to(tl.float32)
    return tile


@triton.jit
def _forward_kernel(
    x_ptr,
    mix_ptr,
    cells_ptr,
    out_ptr,
    H,
    W,
    OH,
    OW,
    C_OUT_GROUP,
    C_IN_GROUP,
    sxb,
    sxc,
    sxh,
    sxw,
    sob,
    soc,
    soh,
    sow,
    STRIDE_H,
    STRIDE_W,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    N_CELLS,
    C_OUT_CELL,
    C_IN_CELL,
    K_CELL,
    OUT_BLOCKS,
    IN_BLOCKS,
    M_CELLS,
    SE_CELL,
    SE_OUT,
    TILES_N,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_CELL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    sample = tl.program_id(2).to(tl.int64)
    group = tl.program_id(1) // TILES_N
    pos = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    oh, ow = pos // OW, pos % OW
    pos_ok = pos < OH * OW
    first_oc = group * C_OUT_GROUP + (tl.program_id(1) % TILES_N) * BLOCK_N
    oc_local = (tl.program_id(1) % TILES_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    oc = group * C_OUT_GROUP + oc_local
    oc_ok = oc_local < C_OUT_GROUP
    x_sample = x_ptr + sample * sxb + (group * C_IN_GROUP).to(tl.int64) * sxc
    mix = mix_ptr + sample * M_CELLS * N_CELLS
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kpos in range(KH * KW):
        ih = oh * STRIDE_H - PAD_H + (kpos // KW) * DIL_H
        iw = ow * STRIDE_W - PAD_W + (kpos % KW) * DIL_W
        inside = pos_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        rows = x_sample + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        for c0 in range(0, C_IN_GROUP, BLOCK_K):
            ci = c0 + tl.arange(0, BLOCK_K)
            ci_ok = ci < C_IN_GROUP
            xt = tl.load(
                rows[:, None] + ci[None, :].to(tl.int64) * sxc,
                mask=inside[:, None] & ci_ok[None, :],
                other=0.0,
            )
            wt = _weight_tile(
                mix,
                cells_ptr,
                oc[None, :],
                ci[:, None],
                kpos,
                ci_ok[:, None] & oc_ok[None, :],
                first_oc,
                c0,
                N_CELLS,
                C_OUT_CELL,
                C_IN_CELL,
                K_CELL,
                OUT_BLOCKS,
                IN_BLOCKS,
                SE_CELL,
                SE_OUT,
                ONE_CELL,
            )
            acc = tl.dot(xt, wt.to(xt.dtype), acc, input_precision=PRECISION)
    out = (
        out_ptr
        + sample * sob
        + (oc.to(tl.int64) * soc)[None, :]
        + (oh.to(tl.int64) * soh + ow.to(tl.int64) * sow)[:, None]
    )
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=pos_ok[:, None] & oc_ok[None, :])


@triton.jit
def _input_grad_kernel(
    grad_ptr,
    mix_ptr,
    cells_ptr,
    gx_ptr,
    H,
    W,
    OH,
    OW,
    C_OUT_GROUP,
    C_IN_GROUP,
    sgb,
    sgc,
    sgh,
    sgw,
    sxb,
    sxc,
    sxh,
    sxw,
    STRIDE_H,
    STRIDE_W,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    N_CELLS,
    C_OUT_CELL,
    C_IN_CELL,
    K_CELL,
    OUT_BLOCKS,
    IN_BLOCKS,
    M_CELLS,
    SE_CELL,
    SE_OUT,
    TILES_N,
    TILES_M,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_CELL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    sample = tl.program_id(2).to(tl.int64)
    group = tl.program_id(1) // TILES_N
    # input positions of one phase (ih mod stride, iw mod stride): a kernel offset reaches all of
    # them or none, so a strided convolution skips the offsets that reach none
    phase = tl.program_id(0) // TILES_M
    phase_h, phase_w = phase // STRIDE_W, phase % STRIDE_W
    rows_h, rows_w = tl.cdiv(H, STRIDE_H), tl.cdiv(W, STRIDE_W)
    pos = (tl.program_id(0) % TILES_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    ih, iw = phase_h + (pos // rows_w) * STRIDE_H, phase_w + (pos % rows_w) * STRIDE_W
    pos_ok = (pos < rows_h * rows_w) & (ih < H) & (iw < W)
    first_ci = (tl.program_id(1) % TILES_N) * BLOCK_N
    ci = first_ci + tl.arange(0, BLOCK_N)
    ci_ok = ci < C_IN_GROUP
    grad_sample = grad_ptr + sample * sgb + (group * C_OUT_GROUP).to(tl.int64) * sgc
    mix = mix_ptr + sample * M_CELLS * N_CELLS
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kpos in range(KH * KW):
        # the output position that reads input (ih, iw) at this kernel offset, where there is one
        shift_h = PAD_H - (kpos // KW) * DIL_H
        shift_w = PAD_W - (kpos % KW) * DIL_W
        if ((phase_h + shift_h) % STRIDE_H == 0) & ((phase_w + shift_w) % STRIDE_W == 0):
            th, tw = ih + shift_h, iw + shift_w
            oh, ow = th // STRIDE_H, tw // STRIDE_W
            reached = pos_ok & (th >= 0) & (tw >= 0) & (oh < OH) & (ow < OW)
            rows = grad_sample + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
            for c0 in range(0, C_OUT_GROUP, BLOCK_K):
                oc_local = c0 + tl.arange(0, BLOCK_K)
                oc_ok = oc_local < C_OUT_GROUP
                gt = tl.load(
                    rows[:, None] + oc_local[None, :].to(tl.int64) * sgc,
                    mask=reached[:, None] & oc_ok[None, :],
                    other=0.0,
                )
                oc = group * C_OUT_GROUP + oc_local
                wt = _weight_tile(
                    mix,
                    cells_ptr,
                    oc[:, None],
                    ci[None, :],
                    kpos,
                    oc_ok[:, None] & ci_ok[None, :],
                    group * C_OUT_GROUP + c0,
                    first_ci,
                    N_CELLS,
                    C_OUT_CELL,
                    C_IN_CELL,
                    K_CELL,
                    OUT_BLOCKS,
                    IN_BLOCKS,
                    SE_CELL,
                    SE_OUT,
                    ONE_CELL,
                )
                acc = tl.dot(gt, wt.to(gt.dtype), acc, input_precision=PRECISION)
    gx = (
        gx_ptr
        + sample * sxb
        + ((group * C_IN_GROUP + ci).to(tl.int64) * sxc)[None, :]
        + (ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None]
    )
    tl.store(gx, acc.to(gx_ptr.dtype.element_ty), mask=pos_ok[:, None] & ci_ok[None, :])


@triton.jit
def _weight_grad_kernel(
    x_ptr,
    grad_ptr,
    gw_ptr,
    H,
    W,
    OH,
    OW,
    C_OUT_GROUP,
    C_IN_GROUP,
    sxb,
    sxc,
    sxh,
    sxw,
    sgb,
    sgc,
    sgh,
    sgw,
    STRIDE_H,
    STRIDE_W,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    C_OUT_CELL,
    C_IN_CELL,
    K_CELL,
    OUT_BLOCKS,
    IN_BLOCKS,
    M_CELLS,
    TILES_CI,
    TILES_OC,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_OC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    sample = tl.program_id(2).to(tl.int64)
    kpos = tl.program_id(0) // TILES_CI
    ci = (tl.program_id(0) % TILES_CI) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < C_IN_GROUP
    group = tl.program_id(1) // TILES_OC
    oc_local = (tl.program_id(1) % TILES_OC) * BLOCK_OC + tl.arange(0, BLOCK_OC)
    oc_ok = oc_local < C_OUT_GROUP
    oc = group * C_OUT_GROUP + oc_local
    x_rows = x_ptr + sample * sxb + ((group * C_IN_GROUP + ci).to(tl.int64) * sxc)[:, None]
    grad_cols = grad_ptr + sample * sgb + (oc.to(tl.int64) * sgc)[None, :]
    acc = tl.zeros((BLOCK_CI, BLOCK_OC), tl.float32)
    for p0 in range(0, OH * OW, BLOCK_L):
        pos = p0 + tl.arange(0, BLOCK_L)
        oh, ow = pos // OW, pos % OW
        pos_ok = pos < OH * OW
        ih = oh * STRIDE_H - PAD_H + (kpos // KW) * DIL_H
        iw = ow * STRIDE_W - PAD_W + (kpos % KW) * DIL_W
        inside = pos_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xt = tl.load(
            x_rows + (ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[None, :],
            mask=ci_ok[:, None] & inside[None, :],
            other=0.0,
        )
        gt = tl.load(
            grad_cols + (oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw)[:, None],
            mask=pos_ok[:, None] & oc_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(xt, gt, acc, input_precision=PRECISION)
    # dW split into cells: (sample, m, c_out, c_in, k_cell), what the mixture and cell gradients read
    cell_size = C_OUT_CELL * C_IN_CELL * K_CELL
    cell = ((kpos // K_CELL) * OUT_BLOCKS + oc // C_OUT_CELL)[None, :] * IN_BLOCKS + (ci // C_IN_CELL)[
        :, None
    ]
    within = ((oc % C_OUT_CELL) * C_IN_CELL * K_CELL)[None, :] + ((ci % C_IN_CELL) * K_CELL + kpos % K_CELL)[
        :, None
    ]
    gw = gw_ptr + sample * M_CELLS * cell_size + cell.to(tl.int64) * cell_size + within
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


def _out_size(x4: torch.Tensor, plane: _Plane) -> tuple[int, int]:
    return tuple(
        (x4.shape[2 + i] + 2 * plane.padding[i] - plane.dilation[i] * (plane.kernel[i] - 1) - 1)
        // plane.stride[i]
        + 1
        for i in range(2)
    )


def _block(size: int, most: int) -> int:
    """A tile edge for ``size`` elements: a power of two from 16 (the least a matrix product takes)
    to ``most``."""
    return min(most, max(16, triton.next_power_of_2(size)))


def _precision(dtype: torch.dtype) -> str:
    allow_tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return "tf32" if allow_tf32 else "ieee"


class _Cells(NamedTuple):
    """The warehouse as the kernels read it, and the cell geometry of the layer."""

    mixture: torch.Tensor  # (B, m, n), contiguous
    cells: torch.Tensor  # (n, c_out, c_in * k_cell), the last dimension contiguous
    num: int
    c_out: int
    c_in: int
    k_cell: int
    out_blocks: int
    in_blocks: int

    @classmethod
    def of(cls, mixture: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry) -> _Cells:
        num, c_out, c_in = cells.shape[:3]
        flat = cells.reshape(num, c_out, -1)
        if flat.stride(2) != 1:
            flat = flat.contiguous()
        return cls(
            mixture.contiguous(),
            flat,
            num,
            c_out,
            c_in,
            math.prod(cells.shape[3:]),
            geo.grid.out_blocks,
            geo.grid.in_blocks,
        )

    def args(self) -> list[int]:
        """N_CELLS .. SE_OUT of the forward and input-gradient kernels."""
        return [
            self.num,
            self.c_out,
            self.c_in,
            self.k_cell,
            self.out_blocks,
            self.in_blocks,
            self.mixture.shape[1],
            self.cells.stride(0),
            self.cells.stride(1),
        ]

    def one_cell(self, plane: _Plane, weight_shape: tuple[int, ...], tile_out: int, tile_in: int) -> bool:
        """Whether every tile of ``tile_out`` output channels by ``tile_in`` input channels lies in
        one cell (tiles start at multiples of their size within a group)."""
        c_out_group, c_in_group = weight_shape[0] // plane.groups, weight_shape[1]
        return (
            self.c_out % tile_out == 0
            and c_out_group % tile_out == 0
            and self.c_in % tile_in == 0
            and c_in_group % tile_in == 0
        )


def _like_input(
    x4: torch.Tensor, batch: int, channels: int, size: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """An empty (B, C, H, W) tensor laid out as ``x4``: channels last where its channels are."""
    if x4.stride(1) == 1 and x4.shape[1] > 1:
        return torch.empty(batch, *size, channels, device=x4.device, dtype=dtype).permute(0, 3, 1, 2)
    return torch.empty(batch, channels, *size, device=x4.device, dtype=dtype)


def _conv_args(plane: _Plane) -> list[int]:
    return [*plane.stride, *plane.padding, *plane.dilation]


def forward(x: torch.Tensor, mixture: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """The layer's output without bias, in x's dtype: ``_forward_kernel``."""
    plane, x4, warehouse = _plane(geo), _as_4d(x, geo), _Cells.of(mixture, cells, geo)
    batch, c_out, c_in_group = x4.shape[0], geo.weight_shape[0], geo.weight_shape[1]
    c_out_group = c_out // plane.groups
    size = _out_size(x4, plane)
    out = _like_input(x4, batch, c_out, size, x.dtype)
    block_m = _block(size[0] * size[1], tuning.TRITON_BLOCK_POSITIONS)
    block_n = _block(c_out_group, tuning.TRITON_BLOCK_CHANNELS)
    block_k = _block(c_in_group, tuning.TRITON_BLOCK_REDUCTION)
    tiles_n = triton.cdiv(c_out_group, block_n)
    grid = (triton.cdiv(size[0] * size[1], block_m), plane.groups * tiles_n, batch)
    _forward_kernel[grid](
        x4,
        warehouse.mixture,
        warehouse.cells,
        out,
        *x4.shape[2:],
        *size,
        c_out_group,
        c_in_group,
        *x4.stride(),
        *out.stride(),
        *_conv_args(plane),
        *warehouse.args(),
        tiles_n,
        KH=plane.kernel[0],
        KW=plane.kernel[1],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        ONE_CELL=warehouse.one_cell(plane, geo.weight_shape, block_n, block_k),
        PRECISION=_precision(x.dtype),
        num_warps=tuning.TRITON_WARPS,
    )
    return _from_4d(out, geo)


def input_grad(
    grad: torch.Tensor, mixture: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry, x: torch.Tensor
) -> torch.Tensor:
    """The gradient with respect to x (shaped and laid out as x): ``_input_grad_kernel``."""
    plane, x4, g4, warehouse = _plane(geo), _as_4d(x, geo), _as_4d(grad, geo), _Cells.of(mixture, cells, geo)
    batch, c_in_group = x4.shape[0], geo.weight_shape[1]
    c_out_group = geo.weight_shape[0] // plane.groups
    gx = torch.empty_like(x)
    gx4 = _as_4d(gx, geo)
    # input positions by phase (position mod stride): per phase at most this many
    positions = triton.cdiv(x4.shape[2], plane.stride[0]) * triton.cdiv(x4.shape[3], plane.stride[1])
    block_m = _block(positions, tuning.TRITON_BLOCK_POSITIONS)
    block_n = _block(c_in_group, tuning.TRITON_BLOCK_CHANNELS)
    block_k = _block(c_out_group, tuning.TRITON_BLOCK_REDUCTION)
    tiles_n, tiles_m = triton.cdiv(c_in_group, block_n), triton.cdiv(positions, block_m)
    grid = (plane.stride[0] * plane.stride[1] * tiles_m, plane.groups * tiles_n, batch)
    _input_grad_kernel[grid](
        g4,
        warehouse.mixture,
        warehouse.cells,
        gx4,
        *x4.shape[2:],
        *g4.shape[2:],
        c_out_group,
        c_in_group,
        *g4.stride(),
        *gx4.stride(),
        *_conv_args(plane),
        *warehouse.args(),
        tiles_n,
        tiles_m,
        KH=plane.kernel[0],
        KW=plane.kernel[1],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        ONE_CELL=warehouse.one_cell(plane, geo.weight_shape, block_k, block_n),
        PRECISION=_precision(grad.dtype),
        num_warps=tuning.TRITON_WARPS,
    )
    return gx


def weight_grad(x: torch.Tensor, grad: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """Per-sample weight gradients split into cells, (B, m, cell elements), in fp32:
    ``_weight_grad_kernel``."""
    plane, x4, g4 = _plane(geo), _as_4d(x, geo), _as_4d(grad, geo)
    batch, c_out, c_in_group = x4.shape[0], geo.weight_shape[0], geo.weight_shape[1]
    c_out_group = c_out // plane.groups
    kernel = plane.kernel[0] * plane.kernel[1]
    num_cells = math.prod(geo.grid)
    gw = torch.empty(batch, num_cells, cells[0].numel(), device=x.device, dtype=torch.float32)
    block_l = _block(g4.shape[2] * g4.shape[3], tuning.TRITON_BLOCK_REDUCTION)
    block_ci = _block(c_in_group, tuning.TRITON_BLOCK_CHANNELS)
    block_oc = _block(c_out_group, tuning.TRITON_BLOCK_CHANNELS)
    tiles_ci, tiles_oc = triton.cdiv(c_in_group, block_ci), triton.cdiv(c_out_group, block_oc)
    grid = (kernel * tiles_ci, plane.groups * tiles_oc, batch)
    _weight_grad_kernel[grid](
        x4,
        g4,
        gw,
        *x4.shape[2:],
        *g4.shape[2:],
        c_out_group,
        c_in_group,
        *x4.stride(),
        *g4.stride(),
        *_conv_args(plane),
        *cells.shape[1:3],
        math.prod(cells.shape[3:]),
        geo.grid.out_blocks,
        geo.grid.in_blocks,
        num_cells,
        tiles_ci,
        tiles_oc,
        KH=plane.kernel[0],
        KW=plane.kernel[1],
        BLOCK_L=block_l,
        BLOCK_CI=block_ci,
        BLOCK_OC=block_oc,
        PRECISION=_precision(x.dtype),
        num_warps=tuning.TRITON_WARPS,
    )
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
