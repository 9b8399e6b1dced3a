"""Execution: assemble per-sample weights from mixture weights and a warehouse, then convolve.

Cells of a layer are numbered (spatial block, output block, input block); cell (s, o, i) fills
``W[o*c_out:(o+1)*c_out, i*c_in:(i+1)*c_in]`` at kernel position s (row-major), or the whole
kernel when cells are not split spatially.

The reference implementation of KernelWarehouse (Li & Yao, ICML 2024) assembles all B per-sample
weights and runs one convolution with ``groups = groups * B``. :func:`kw_conv` computes the same
function along one of several *paths* (:data:`PATHS`), all equal up to float rounding:

``reference``
    the reference scheme; autograd keeps the B assembled weights alive until backward.
``grouped``
    the same forward; when a gradient is needed, a custom backward recomputes the weights, so only
    the input, the mixture weights and the warehouse are kept (training memory near the static
    model's), and computes the warehouse and attention gradients from the weight gradient.
``unfold``
    assembled weights applied as one batched matrix product over shifted input views: no ``groups = B`` and a graph whose batch size is free, which is what export and tracing
    need; on CPU also faster than the grouped convolution on small feature maps.
``mix`` (layers it does not apply to take ``grouped``)
    never assembles: the input patches are first mixed with the attention, then multiplied by the
    whole warehouse at once, ``out = sum_j E_j (sum_s a_sj x_s)``. It costs more multiply-adds but
    runs as one dense product (a pointwise convolution); it wins where the map is small and the
    warehouse is not (the last stages of a ResNet). Needs ``groups = 1`` and cells of kernel size 1.
    In training its backward recomputes the mixed patches (activation checkpointing).
``loop`` (eager mode; otherwise ``grouped``)
    one sample at a time: its weight is assembled output channel by output channel, in the order a
    convolution reads fastest, and applied by a plain convolution, a slice of output channels at a
    time for large weights. Every weight stays in cache and nothing of size B |W| exists. Its
    backward recomputes each weight, or takes the ``mix`` form where that is cheaper. The fastest
    path on CPU.

``auto`` (the default) picks per call: ``unfold`` under tracing or ONNX export, and otherwise the
fastest by :func:`choose_path`, with ``unfold`` for ``grouped`` under ``torch.compile`` (so a
compiled graph serves every batch size; the compiler then plans what backward keeps).
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
PATHS = ("auto", "reference", "grouped", "unfold", "mix", "loop")

_path = "auto"


def set_execution_path(path: str) -> str:
    """Use ``path`` (one of :data:`PATHS`) for every KernelWarehouse layer; returns the previous one."""
    global _path
    if path not in PATHS:
        raise ValueError(f"execution path must be one of {PATHS}, got {path!r}")
    previous, _path = _path, path
    return previous


def get_execution_path() -> str:
    return _path


@contextlib.contextmanager
def execution_path(path: str) -> Iterator[None]:
    """Context manager form of :func:`set_execution_path`."""
    previous = set_execution_path(path)
    try:
        yield
    finally:
        set_execution_path(previous)


def assemble_weights(attention: torch.Tensor, cells: torch.Tensor, grid: Sequence[int],
                     weight_shape: Sequence[int]) -> torch.Tensor:
    """(B, m, n) mixture weights and (n, c_out, c_in, *k_cell) cells -> (B, *weight_shape)."""
    batch, num, c_out, dims = attention.shape[0], cells.shape[0], cells.shape[1], cells.dim() - 3
    kernel = range(6, 6 + dims)
    if torch.compiler.is_compiling():  # the compiler cannot batch the shared rows over a free batch
        mixed = torch.matmul(attention.reshape(-1, num), cells.reshape(num, -1))
        mixed = mixed.reshape(batch, *grid, *cells.shape[1:])
        # (B, spatial, out, in, c_out, c_in, *k) -> (B, out, c_out, in, c_in, spatial, *k)
        return mixed.permute(0, 2, 4, 3, 5, 1, *kernel).reshape(batch, *weight_shape)
    # one product per output channel of the cells, which is how the warehouse is stored
    mixed = _mix_rows(attention.reshape(-1, num), _by_output(cells))
    mixed = mixed.reshape(c_out, batch, *grid, *cells.shape[2:])
    # (c_out, B, spatial, out, in, c_in, *k) -> (B, out, c_out, in, c_in, spatial, *k)
    return mixed.permute(1, 3, 0, 4, 5, 2, *kernel).reshape(batch, *weight_shape)


def split_into_cells(weight: torch.Tensor, grid: Sequence[int], cell_shape: Sequence[int]) -> torch.Tensor:
    """The inverse of assembly: (*weight_shape) -> (m, *cell_shape), or with a leading batch
    dimension (B, *weight_shape) -> (B, m, *cell_shape)."""
    dims = len(cell_shape) - 2
    batch = weight.shape[:weight.dim() - dims - 2]
    lead = len(batch)
    spatial, out_blocks, in_blocks = grid
    c_out, c_in = cell_shape[:2]
    # (out, c_out, in, c_in, spatial, *k) -> (spatial, out, in, c_out, c_in, *k)
    cells = weight.reshape(*batch, out_blocks, c_out, in_blocks, c_in, spatial, *cell_shape[2:])
    order = [lead + d for d in (4, 0, 2, 1, 3)] + [lead + 5 + d for d in range(dims)]
    cells = cells.permute(*range(lead), *order)
    return cells.reshape(*batch, spatial * out_blocks * in_blocks, *cell_shape)


def _grouped_conv(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int] | str,
                  dilation: Sequence[int], groups: int) -> torch.Tensor:
    """Sample b of ``x`` with ``weight[b]`` as one convolution of ``groups * B`` groups."""
    conv: Callable = CONV[weight.dim() - 3]
    batch = x.shape[0]
    out = conv(x.reshape(1, -1, *x.shape[2:]), weight.reshape(-1, *weight.shape[2:]), None,
               stride, padding, dilation, groups * batch)
    return out.reshape(batch, -1, *out.shape[2:])


def _shifted(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
             dilation: Sequence[int], channels_last: bool = False) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The input at every kernel offset, stacked: (B, C, K, *out) with K = prod(kernel) in row-major
    kernel order (what ``F.unfold`` gives, for 1-d and 2-d), or (B, *out, C, K) with ``channels_last``.

    Built from strided slices rather than ``im2col``, which is slow on CPU and exports to ONNX poorly.
    """
    dims = len(kernel)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    size = tuple((x.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(dims))
    views = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = [slice(None), slice(None)] + [
            slice(o * d, o * d + (n - 1) * s + 1, s) for o, d, n, s in zip(offset, dilation, size, stride)]
        view = x[tuple(index)]
        views.append(view.movedim(1, -1) if channels_last else view)
    return torch.stack(views, dim=-1 if channels_last else 2), size


def _unfold_conv(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int) -> torch.Tensor:
    """Per-sample convolution as a batched matrix product over shifted input views."""
    batch, c_out = weight.shape[:2]
    patch = math.prod(weight.shape[2:])  # explicit sizes: a batch left free by the compiler divides nothing
    cols, size = _shifted(x, weight.shape[3:], stride, padding, dilation)
    cols = cols.reshape(batch, groups, patch, math.prod(size))
    out = torch.matmul(weight.reshape(batch, groups, c_out // groups, patch), cols)
    return out.reshape(batch, c_out, *size)


def _by_output(cells: torch.Tensor) -> torch.Tensor:
    """(n, c_out, c_in, *k_cell) cells as a (c_out, n, c_in * k_cell) view: one matrix per output channel."""
    return cells.reshape(cells.shape[0], cells.shape[1], -1).transpose(0, 1)


def _mix_rows(rows: torch.Tensor, by_output: torch.Tensor) -> torch.Tensor:
    """Mixture rows (r, n) applied to each output channel's cells (c, n, d): (c, r, d)."""
    return torch.bmm(rows.expand(by_output.shape[0], -1, -1), by_output)


def _sample_rows(attention: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """One sample's (m, n) mixture weights as (output block, spatial * input block, n)."""
    spatial, out_blocks, in_blocks = geo.grid
    rows = attention.reshape(spatial, out_blocks, in_blocks, -1).transpose(0, 1)
    return rows.reshape(out_blocks, spatial * in_blocks, -1)


def _as_weight(products: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """(c, spatial * input block, c_in * k) products of mixture rows and cells -> (c, I/groups, *k)
    weights of c output channels, channels-last for spatially split cells, without a copy."""
    channels, c_in = products.shape[0], geo.weight_shape[1]
    if geo.grid[0] == 1:
        return products.reshape(channels, *geo.weight_shape[1:])
    return products.reshape(channels, *geo.weight_shape[2:], c_in).movedim(-1, 1)


def _sample_weight(attention: torch.Tensor, by_output: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """One sample's weight from its (m, n) mixture weights, built in the order a convolution reads
    fastest: (output channel, kernel offset, input channel) for spatially split cells, which is a
    channels-last weight, else the plain (output, input, kernel) order. Either way one batched
    product per output block, ``W[o] = a @ E[o]``, and no reordering copy."""
    products = [_mix_rows(r, by_output) for r in _sample_rows(attention, geo)]
    return _as_weight(products[0] if len(products) == 1 else torch.cat(products), geo)


def _sample_cell_grads(grad_weight: torch.Tensor, attention: torch.Tensor, by_output: torch.Tensor,
                       geo: ConvGeometry, grad_by_output: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_sample_weight` for gradients: from one sample's weight gradient, return
    the gradient of its (m, n) mixture weights and add its share to the cells' (c_out, n, c_in * k)."""
    spatial, out_blocks, in_blocks = geo.grid
    c_out, num = by_output.shape[:2]
    if spatial > 1:
        grad_weight = grad_weight.movedim(1, -1)  # (O, *k, I): the order _sample_weight built
    grad_weight = grad_weight.reshape(out_blocks, c_out, spatial * in_blocks, -1)
    rows = _sample_rows(attention, geo)
    grad_rows = []
    for o in range(out_blocks):
        grad_rows.append(torch.bmm(grad_weight[o], by_output.transpose(1, 2)).sum(0))
        grad_by_output.baddbmm_(rows[o].t().expand(c_out, -1, -1), grad_weight[o])  # += a^T dW per channel
    grad_rows = torch.stack(grad_rows).reshape(out_blocks, spatial, in_blocks, num).transpose(0, 1)
    return grad_rows.reshape(-1, num)


def _loop_conv(x: torch.Tensor, attention: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """Sample by sample: assemble one weight (:func:`_sample_weight`), run one plain convolution.

    Without groups, a large weight (a ResNet's last stage) is built and applied a slice of output
    channels at a time, so that the slice, the convolution's copy of it and the cells it reads share
    the cache; the slices go outside, the samples inside, so each slice of cells is read once."""
    by_output, conv, batch = _by_output(cells), CONV[geo.dims], x.shape[0]
    channels = step = by_output.shape[0]
    per_channel = geo.grid[0] * geo.grid[2] * by_output.shape[2]
    while geo.groups == 1 and step * per_channel > LOOP_SLICE_ELEMENTS and step % 32 == 0:
        step //= 2  # halving keeps slices a multiple of 16 channels, which the convolution prefers
    if geo.groups > 1 or geo.grid[1] * channels * per_channel <= LOOP_SLICE_ELEMENTS:
        # the whole weight at once: one convolution per sample
        outs = [conv(x[b:b + 1], _sample_weight(attention[b], by_output, geo), None, geo.stride, geo.padding,
                     geo.dilation, geo.groups) for b in range(batch)]
        return outs[0] if batch == 1 else torch.cat(outs)
    rows = [_sample_rows(attention[b], geo) for b in range(batch)]
    slices = []
    for block in range(geo.grid[1]):
        for start in range(0, channels, step):
            part = by_output[start:start + step]
            outs = [conv(x[b:b + 1], _as_weight(_mix_rows(rows[b][block], part), geo), None, geo.stride,
                         geo.padding, geo.dilation) for b in range(batch)]
            slices.append(outs[0] if batch == 1 else torch.cat(outs))
    return slices[0] if len(slices) == 1 else torch.cat(slices, dim=1)


# Weight elements :func:`_loop_conv` builds and applies at once, measured on CPU: a 256x256x3x3
# weight in one piece, a 512x512x3x3 one in slices of 128 output channels.
LOOP_SLICE_ELEMENTS = 600_000


def _add_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias.to(out.dtype).reshape(1, -1, *([1] * (out.dim() - 2)))


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


def conv_per_sample(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    stride: Sequence[int], padding: Sequence[int] | str, dilation: Sequence[int],
                    groups: int) -> torch.Tensor:
    """Convolve sample b of ``x`` with ``weight[b]`` (B, C_out, C_in/groups, *k) in one call.

    One grouped convolution (a plain one for a single sample); under export, tracing or
    ``torch.compile`` the batch-free matrix-product form, so graphs hold for every batch size.
    """
    free_batch = _exporting() or torch.compiler.is_compiling()
    if free_batch and not isinstance(padding, str):
        return _add_bias(_unfold_conv(x, weight, stride, padding, dilation, groups), bias)
    if not free_batch and x.shape[0] == 1:
        return CONV[weight.dim() - 3](x, weight[0], bias, stride, padding, dilation, groups)
    return _add_bias(_grouped_conv(x, weight, stride, padding, dilation, groups), bias)


def linear_per_sample(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, C_in) with weight (B, C_out, C_in) -> (B, T, C_out)."""
    out = torch.matmul(x, weight.transpose(1, 2))
    return out if bias is None else out + bias.to(out.dtype)


class ConvGeometry(NamedTuple):
    """Everything of a per-sample convolution that is not a tensor. ``dims = 0`` means linear."""

    grid: tuple[int, int, int]
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def dims(self) -> int:
        return len(self.weight_shape) - 2 if self.stride else 0


def _apply(x: torch.Tensor, weight: torch.Tensor, geo: ConvGeometry, path: str) -> torch.Tensor:
    if not geo.dims:
        return linear_per_sample(x, weight.flatten(2), None)
    if path == "unfold":
        return _unfold_conv(x, weight, geo.stride, geo.padding, geo.dilation, geo.groups)
    if not torch.compiler.is_compiling() and x.shape[0] == 1:
        return CONV[geo.dims](x, weight[0], None, geo.stride, geo.padding, geo.dilation, geo.groups)
    return _grouped_conv(x, weight, geo.stride, geo.padding, geo.dilation, geo.groups)


# Weight elements one step of the recomputing path assembles at once: B |W| floats for a ResNet's
# last stage at batch 32 would outweigh the activations saved for backward. (Larger steps were
# faster on an H100 but took the peak memory from 1.1 to 2.0 times the static model's.)
CHUNK_ELEMENTS = 1 << 23


def _chunks(batch: int, weight_numel: int) -> list[slice]:
    size = max(1, min(batch, CHUNK_ELEMENTS // max(weight_numel, 1)))
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


class _RecomputedWeights(torch.autograd.Function):
    """Per-sample convolution whose backward recomputes the assembled weights.

    Saves only x, the mixture weights (B, m, n) and the warehouse, and works through the batch in
    chunks (one sample at a time on the ``loop`` path) so that few assembled weights exist at any
    time. With dW the gradient of a chunk's per-sample weights, split into cells (b, m, cell):
    d(attention) = dW cells^T and d(cells) = sum_b attention_b^T dW_b. Where ``mix`` is cheap, the
    ``loop`` path's backward takes the mix form (:func:`_mix_backward`) and builds no weight at all.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, attention: torch.Tensor, cells: torch.Tensor,  # type: ignore[override]
                geo: ConvGeometry, path: str) -> torch.Tensor:
        ctx.save_for_backward(x, attention, cells)
        ctx.geo, ctx.path = geo, path
        if path == "loop":
            out = _loop_conv(x, attention, cells, geo)
        else:
            outs = [_apply(x[part], assemble_weights(attention[part], cells, geo.grid, geo.weight_shape), geo, path)
                    for part in _chunks(x.shape[0], math.prod(geo.weight_shape))]
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
        ctx.dtype = out.dtype  # under autocast, what the products ran in; backward runs in it too
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        x, attention, cells = (t.to(ctx.dtype) for t in saved)
        grad = grad.to(ctx.dtype)
        geo: ConvGeometry = ctx.geo
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_attention = torch.empty_like(attention)
        if ctx.path == "loop" and mix_is_cheap(geo, cells.shape, math.prod(grad.shape[2:])):
            grad_cells = _mix_backward(x, attention, cells, grad, geo, grad_x, grad_attention)
        elif ctx.path == "loop":
            grad_cells = _loop_backward(x, attention, cells, grad, geo, grad_x, grad_attention)
        else:
            grad_cells = _chunked_backward(x, attention, cells, grad, geo, grad_x, grad_attention)
        grads = (grad_x, grad_attention, grad_cells)
        return (*(g if g is None else g.to(t.dtype) for g, t in zip(grads, saved)), None, None)


def _loop_backward(x: torch.Tensor, attention: torch.Tensor, cells: torch.Tensor, grad: torch.Tensor,
                   geo: ConvGeometry, grad_x: torch.Tensor | None, grad_attention: torch.Tensor) -> torch.Tensor:
    """Backward of :func:`_loop_conv`, sample by sample; fills grad_x and grad_attention, returns the
    cells' gradient."""
    by_output = _by_output(cells)
    grad_by_output = torch.zeros(by_output.shape, dtype=by_output.dtype, device=by_output.device)
    for b in range(x.shape[0]):
        weight = _sample_weight(attention[b], by_output, geo)
        gx, gw = _weight_backward(x[b:b + 1], weight.unsqueeze(0), grad[b:b + 1], geo, grad_x is not None)
        if grad_x is not None:
            grad_x[b] = gx[0]
        grad_attention[b] = _sample_cell_grads(gw[0], attention[b], by_output, geo, grad_by_output)
    return grad_by_output.transpose(0, 1).reshape(cells.shape)


def _chunked_backward(x: torch.Tensor, attention: torch.Tensor, cells: torch.Tensor, grad: torch.Tensor,
                      geo: ConvGeometry, grad_x: torch.Tensor | None, grad_attention: torch.Tensor) -> torch.Tensor:
    """Backward of the assembled paths, a chunk of samples at a time; fills grad_x and
    grad_attention, returns the cells' gradient."""
    cells2d = cells.reshape(cells.shape[0], -1)
    grad_cells = torch.zeros_like(cells2d)
    for part in _chunks(x.shape[0], math.prod(geo.weight_shape)):
        weight = assemble_weights(attention[part], cells, geo.grid, geo.weight_shape)
        gx, gw = _weight_backward(x[part], weight, grad[part], geo, grad_x is not None)
        if grad_x is not None:
            grad_x[part] = gx
        per_cell = split_into_cells(gw, geo.grid, cells.shape[1:])
        per_cell = per_cell.reshape(-1, cells2d.shape[1])
        grad_attention[part] = torch.matmul(per_cell, cells2d.t()).reshape(weight.shape[0], -1, cells.shape[0])
        grad_cells.addmm_(attention[part].reshape(-1, cells.shape[0]).t(), per_cell)
    return grad_cells.reshape(cells.shape)


def _weight_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, geo: ConvGeometry,
                     input_grad: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of a per-sample convolution (or linear) with respect to x and the B weights."""
    if not geo.dims:
        flat = weight.flatten(2)
        grad_x = torch.matmul(grad, flat) if input_grad else None
        return grad_x, torch.matmul(grad.transpose(1, 2), x).reshape(weight.shape)
    batch = x.shape[0]
    merged = lambda t: t.reshape(1, -1, *t.shape[2:])  # noqa: E731
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        merged(grad), merged(x), weight.reshape(-1, *weight.shape[2:]), None, list(geo.stride),
        list(geo.padding), list(geo.dilation), False, [0] * geo.dims, geo.groups * batch,
        [input_grad, True, False])
    return (grad_x.reshape(x.shape) if input_grad else None), grad_w.reshape(weight.shape)


def _mix_features(x: torch.Tensor, attention: torch.Tensor, geo: ConvGeometry,
                  cells_shape: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The shifted inputs mixed by the attention, ``sum_s a_bsj x_b,s``, as channels-last features
    (B * out blocks, c_in * n, L, 1) for one pointwise convolution with the whole warehouse."""
    spatial, out_blocks, in_blocks = geo.grid
    num, c_in = cells_shape[0], cells_shape[2]
    batch = x.shape[0]
    cols, size = _shifted(x, geo.weight_shape[2:], geo.stride, geo.padding, geo.dilation, channels_last=True)
    length = math.prod(size)
    # cols is (B, L, in block, c_in, spatial): make it (position, c_in) x (spatial, in block)
    cols = cols.reshape(batch, length, in_blocks, c_in, spatial)
    cols = cols.permute(0, 1, 3, 4, 2) if in_blocks > 1 else cols
    cols = cols.reshape(batch, length * c_in, spatial * in_blocks)
    mix = attention.reshape(batch, spatial, out_blocks, in_blocks, num).permute(0, 1, 3, 2, 4)
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


def _mix_conv(x: torch.Tensor, attention: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """``out_b = sum_j E_j (sum_s a_bsj x_b,s)``: mix shifted inputs, then one product with all cells,
    run as a pointwise convolution (on CPU the convolution library does it twice as fast as a
    matrix product)."""
    features, size = _mix_features(x, attention, geo, cells.shape)
    weight = _mix_weight(cells)
    if torch.compiler.is_compiling():  # the compiler mistakes the strides of a width-1 channels-last map
        rows = features.permute(0, 2, 3, 1).reshape(-1, weight.shape[1])
        out = torch.matmul(rows, weight.flatten(1).t())
        out = out.reshape(features.shape[0], math.prod(size), weight.shape[0]).transpose(1, 2)
    else:
        out = F.conv2d(features, weight)
    return out.reshape(x.shape[0], geo.grid[1] * weight.shape[0], *size)


def _mix_backward(x: torch.Tensor, attention: torch.Tensor, cells: torch.Tensor, grad: torch.Tensor,
                  geo: ConvGeometry, grad_x: torch.Tensor | None, grad_attention: torch.Tensor) -> torch.Tensor:
    """Backward of a KernelWarehouse convolution in the ``mix`` form, whichever path ran forward:
    the warehouse and mixed-input gradients come from one pointwise convolution backward, the rest
    by autograd through the cheap mixing; no per-sample weight is built. Works through the batch in
    chunks of :data:`CHUNK_ELEMENTS` mixed features. Fills grad_x and grad_attention, returns the
    cells' gradient."""
    weight = _mix_weight(cells)
    grad_weight = torch.zeros_like(weight)
    per_sample = geo.grid[1] * math.prod(grad.shape[2:]) * weight.shape[1]
    for part in _chunks(x.shape[0], per_sample):
        with torch.enable_grad():
            mixture = attention[part].detach().requires_grad_()
            sample = x[part].detach().requires_grad_(grad_x is not None)
            features, _ = _mix_features(sample, mixture, geo, cells.shape)
        inputs = [mixture, sample] if grad_x is not None else [mixture]
        out_grad = grad[part].reshape(features.shape[0], weight.shape[0], -1, 1)
        grad_features, part_weight, _ = torch.ops.aten.convolution_backward(
            out_grad, features.detach(), weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])
        grad_weight += part_weight
        grads = torch.autograd.grad(features, inputs, grad_features)
        grad_attention[part] = grads[0]
        if grad_x is not None:
            grad_x[part] = grads[1]
    num, c_out, c_in = cells.shape[:3]
    return grad_weight.reshape(c_out, c_in, num).permute(2, 0, 1).reshape(cells.shape)


def mix_is_cheap(geo: ConvGeometry, cells_shape: Sequence[int], out_size: int) -> bool:
    """Whether ``mix`` spends at most :data:`MIX_ADVANTAGE` times the multiply-adds of assembling:
    n L |W| / (spatial blocks * input blocks) against (n + L) |W| per sample."""
    num = cells_shape[0]
    spatial, _, in_blocks = geo.grid
    return mix_supported(geo, cells_shape) and num * out_size < MIX_ADVANTAGE * spatial * in_blocks * (num + out_size)


def mix_supported(geo: ConvGeometry, cells_shape: Sequence[int]) -> bool:
    """Whether the ``mix`` path applies to a warehouse of ``cells_shape`` (n, c_out, c_in, *k_cell):
    a convolution with groups 1 and cells of kernel size 1."""
    return geo.dims > 0 and geo.groups == 1 and all(k == 1 for k in cells_shape[3:])


def choose_path(geo: ConvGeometry, cells_shape: Sequence[int], batch: int, out_size: int,
                device_type: str = "cpu") -> str:
    """The fastest path in eager mode for one layer, from its shape (``out_size``: output positions L).

    Per sample, assembling costs n |W| multiply-adds and convolving L |W|; ``mix`` costs
    n L |W| / (spatial blocks * input blocks). A pointwise convolution of a batch is one batched
    matrix product (``unfold``). On CPU, a layer with work enough per sample assembles one sample at
    a time (``loop``): each weight stays in cache, and it beats the grouped convolution by up to 5x
    in a ResNet's last stages, and a plain convolution of one weight assembled in the usual order by
    up to 2x (benchmarks/layers.py measures this). Depthwise layers (a depthwise convolution of B
    samples is one of B * C channels) and small ones (tiny maps, few channels), and every layer off
    CPU, where one grouped convolution is fast, take ``mix`` where the map is small against the
    warehouse and ``grouped`` otherwise.
    """
    if not geo.dims:
        return "grouped"
    compiling = torch.compiler.is_compiling()
    several = compiling or batch > 1  # compiled graphs serve every batch size
    if several and math.prod(geo.weight_shape[2:]) == 1:
        return "unfold"
    if device_type == "cpu" and not compiling:
        # not with few inputs per group (depthwise: products of width 1 by output channel), nor with
        # little work per sample (small maps of small layers: the calls per sample would dominate)
        work = (cells_shape[0] + out_size) * math.prod(geo.weight_shape)
        if geo.weight_shape[1] >= LOOP_MIN_INPUTS and work >= LOOP_MIN_MACS:
            return "loop"
    if several and mix_is_cheap(geo, cells_shape, out_size):
        return "mix"
    return "grouped"


# How many times more multiply-adds ``mix`` may spend than assembling and still be faster.
MIX_ADVANTAGE = 2.5
# Below these, ``auto`` on CPU does not take ``loop``: input channels per group (a depthwise convolution
# of B samples is one depthwise convolution of B * C channels there), and multiply-adds per sample
# (n + L) |W| (a call per sample costs tens of microseconds).
LOOP_MIN_INPUTS = 8
LOOP_MIN_MACS = 1 << 23


def kw_conv(x: torch.Tensor, attention: torch.Tensor, cells: torch.Tensor, bias: torch.Tensor | None,
            geo: ConvGeometry, path: str | None = None) -> torch.Tensor:
    """A KernelWarehouse convolution (or linear, ``geo.dims == 0``) along ``path`` (default: the
    global setting, see :func:`set_execution_path`). All paths compute the same function."""
    path = path or _path
    if path == "auto":
        path = _auto_path(x, cells, geo)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or attention.requires_grad or cells.requires_grad)
    # eager training: backward recomputes instead of keeping what the forward made
    lean = needs_grad and not (_exporting() or torch.compiler.is_compiling())
    if path == "reference":
        weight = assemble_weights(attention, cells, geo.grid, geo.weight_shape)
        out = _apply(x, weight, geo, "grouped")
    elif path == "mix" and mix_supported(geo, cells.shape):
        if lean:
            out = checkpoint(_mix_conv, x, attention, cells, geo, use_reentrant=False, preserve_rng_state=False)
        else:
            out = _mix_conv(x, attention, cells, geo)
    elif path == "loop" and geo.dims and not (_exporting() or torch.compiler.is_compiling()):
        out = _RecomputedWeights.apply(x, attention, cells, geo, path) if lean else _loop_conv(x, attention, cells, geo)
    else:
        path = "grouped" if path in ("mix", "loop") else path
        if lean:
            out = _RecomputedWeights.apply(x, attention, cells, geo, path)
        else:
            out = _apply(x, assemble_weights(attention, cells, geo.grid, geo.weight_shape), geo, path)
    if not geo.dims:
        return out if bias is None else out + bias.to(out.dtype)
    return _add_bias(out, bias)


def _auto_path(x: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry) -> str:
    if _exporting():
        return "unfold"
    out_size = math.prod(_out_size(x.shape[2:], geo)) if geo.dims else x.shape[1]
    path = choose_path(geo, cells.shape, x.shape[0], out_size, x.device.type)
    # a grouped convolution's groups = B would make a compiled graph specific to one batch size
    return "unfold" if path == "grouped" and geo.dims and torch.compiler.is_compiling() else path


def _out_size(size: Sequence[int], geo: ConvGeometry) -> tuple[int, ...]:
    k = geo.weight_shape[2:]
    return tuple((size[i] + 2 * geo.padding[i] - geo.dilation[i] * (k[i] - 1) - 1) // geo.stride[i] + 1
                 for i in range(geo.dims))
