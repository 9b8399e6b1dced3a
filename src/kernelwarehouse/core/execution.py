"""Execution: assemble per-sample weights from mixture weights and a warehouse, then convolve.

This module chooses the path and dispatches; beside it are :mod:`.assembly` (weights from cells,
and back), :mod:`.per_sample` (each sample convolved with its own weight) and the two paths that
need more than those, :mod:`.loop` and :mod:`.mix`.

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
    assembled weights applied as one batched matrix product over shifted input views: no
    ``groups = B`` and a graph whose batch size is free, which is what export and tracing need; on
    CPU also faster than the grouped convolution on small feature maps.
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
    backward recomputes each weight; on small maps it goes by slices of output channels as products
    over the input patches (:func:`.loop.backward_by_slices`), elsewhere it takes the ``mix`` form
    where that is cheaper. The fastest path on CPU, with the native kernels of
    :mod:`kernelwarehouse.native` for every product whose inner dimension is small.

``auto`` (the default) picks per call: ``unfold`` under tracing or ONNX export, and otherwise the
fastest by :func:`choose_path`, with ``unfold`` for ``grouped`` under ``torch.compile`` (so a
compiled graph serves every batch size; the compiler then plans what backward keeps).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .assembly import assemble_weights, split_into_cells
from .loop import backward_by_slices, loop_backward, loop_conv
from .mix import mix_backward, mix_conv, mix_is_cheap, mix_supported
from .per_sample import (CONV, ConvGeometry, add_bias, batch_chunks, conv_per_sample, exporting, grouped_conv,
                         linear_per_sample, unfold_conv, weight_backward)

__all__ = ["PATHS", "ConvGeometry", "assemble_weights", "choose_path", "conv_per_sample", "execution_path",
           "get_execution_path", "kw_conv", "linear_per_sample", "mix_is_cheap", "mix_supported",
           "set_execution_path", "split_into_cells"]


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



def _apply(x: torch.Tensor, weight: torch.Tensor, geo: ConvGeometry, path: str) -> torch.Tensor:
    if not geo.dims:
        return linear_per_sample(x, weight.flatten(2), None)
    if path == "unfold":
        return unfold_conv(x, weight, geo.stride, geo.padding, geo.dilation, geo.groups)
    if not torch.compiler.is_compiling() and x.shape[0] == 1:
        return CONV[geo.dims](x, weight[0], None, geo.stride, geo.padding, geo.dilation, geo.groups)
    return grouped_conv(x, weight, geo.stride, geo.padding, geo.dilation, geo.groups)



class _RecomputedWeights(torch.autograd.Function):
    """Per-sample convolution whose backward recomputes the assembled weights.

    Saves only x, the mixture weights (B, m, n) and the warehouse, and works through the batch in
    chunks (one sample at a time on the ``loop`` path) so that few assembled weights exist at any
    time. With dW the gradient of a chunk's per-sample weights, split into cells (b, m, cell):
    d(attention) = dW cells^T and d(cells) = sum_b attention_b^T dW_b. Where ``mix`` is cheap and the
    map not small enough for :func:`.loop.backward_by_slices`, the ``loop`` path's backward takes the
    mix form (:func:`mix_backward`) and builds no weight at all.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, attention: torch.Tensor, cells: torch.Tensor,  # type: ignore[override]
                geo: ConvGeometry, path: str) -> torch.Tensor:
        ctx.save_for_backward(x, attention, cells)
        ctx.geo, ctx.path = geo, path
        if path == "loop":
            out = loop_conv(x, attention, cells, geo)
        else:
            outs = [_apply(x[part], assemble_weights(attention[part], cells, geo.grid, geo.weight_shape), geo, path)
                    for part in batch_chunks(x.shape[0], math.prod(geo.weight_shape))]
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
        positions = math.prod(grad.shape[2:])
        if ctx.path == "loop" and mix_is_cheap(geo, cells.shape, positions) and not backward_by_slices(geo, positions):
            grad_cells = mix_backward(x, attention, cells, grad, geo, grad_x, grad_attention)
        elif ctx.path == "loop":
            grad_cells = loop_backward(x, attention, cells, grad, geo, grad_x, grad_attention)
        else:
            grad_cells = _chunked_backward(x, attention, cells, grad, geo, grad_x, grad_attention)
        grads = (grad_x, grad_attention, grad_cells)
        return (*(g if g is None else g.to(t.dtype) for g, t in zip(grads, saved)), None, None)



def _chunked_backward(x: torch.Tensor, attention: torch.Tensor, cells: torch.Tensor, grad: torch.Tensor,
                      geo: ConvGeometry, grad_x: torch.Tensor | None, grad_attention: torch.Tensor) -> torch.Tensor:
    """Backward of the assembled paths, a chunk of samples at a time; fills grad_x and
    grad_attention, returns the cells' gradient."""
    cells2d = cells.reshape(cells.shape[0], -1)
    grad_cells = torch.zeros_like(cells2d)
    for part in batch_chunks(x.shape[0], math.prod(geo.weight_shape)):
        weight = assemble_weights(attention[part], cells, geo.grid, geo.weight_shape)
        gx, gw = weight_backward(x[part], weight, grad[part], geo, grad_x is not None)
        if grad_x is not None:
            grad_x[part] = gx
        per_cell = split_into_cells(gw, geo.grid, cells.shape[1:])
        per_cell = per_cell.reshape(-1, cells2d.shape[1])
        grad_attention[part] = torch.matmul(per_cell, cells2d.t()).reshape(weight.shape[0], -1, cells.shape[0])
        grad_cells.addmm_(attention[part].reshape(-1, cells.shape[0]).t(), per_cell)
    return grad_cells.reshape(cells.shape)



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
    lean = needs_grad and not (exporting() or torch.compiler.is_compiling())
    if path == "reference":
        weight = assemble_weights(attention, cells, geo.grid, geo.weight_shape)
        out = _apply(x, weight, geo, "grouped")
    elif path == "mix" and mix_supported(geo, cells.shape):
        if lean:
            out = checkpoint(mix_conv, x, attention, cells, geo, use_reentrant=False, preserve_rng_state=False)
        else:
            out = mix_conv(x, attention, cells, geo)
    elif path == "loop" and geo.dims and not (exporting() or torch.compiler.is_compiling()):
        out = _RecomputedWeights.apply(x, attention, cells, geo, path) if lean else loop_conv(x, attention, cells, geo)
    else:
        path = "grouped" if path in ("mix", "loop") else path
        if lean:
            out = _RecomputedWeights.apply(x, attention, cells, geo, path)
        else:
            out = _apply(x, assemble_weights(attention, cells, geo.grid, geo.weight_shape), geo, path)
    if not geo.dims:
        return out if bias is None else out + bias.to(out.dtype)
    return add_bias(out, bias)



def _auto_path(x: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry) -> str:
    if exporting():
        return "unfold"
    out_size = math.prod(_out_size(x.shape[2:], geo)) if geo.dims else x.shape[1]
    path = choose_path(geo, cells.shape, x.shape[0], out_size, x.device.type)
    # a grouped convolution's groups = B would make a compiled graph specific to one batch size
    return "unfold" if path == "grouped" and geo.dims and torch.compiler.is_compiling() else path



def _out_size(size: Sequence[int], geo: ConvGeometry) -> tuple[int, ...]:
    k = geo.weight_shape[2:]
    return tuple((size[i] + 2 * geo.padding[i] - geo.dilation[i] * (k[i] - 1) - 1) // geo.stride[i] + 1
                 for i in range(geo.dims))
