"""The lean training form of the assembling paths: a per-sample convolution whose backward
recomputes the assembled weights instead of keeping them.
"""

from __future__ import annotations

import math

import contextlib

import torch

from .. import native
from .assembly import assemble_weights, split_into_cells
from .fused import fused_backward, fused_conv
from .loop import loop_backward, loop_conv
from .mix import mix_backward
from .per_sample import (
    CONV,
    BackwardOperands,
    ConvGeometry,
    batch_chunks,
    grouped_conv,
    linear_per_sample,
    unfold_conv,
    weight_backward,
)

#: The paths whose training form takes one of :data:`LOOP_BACKWARDS`.
ONE_BY_ONE = ("loop", "patches", "fused")

#: How the backward of the ``loop`` path may run: by slices of output channels over the input
#: patches, sample by sample, or in the ``mix`` form (no weight built at all).
LOOP_BACKWARDS = ("slices", "sample", "mix")


def apply_weights(x: torch.Tensor, weight: torch.Tensor, geo: ConvGeometry, path: str) -> torch.Tensor:
    """Sample b of ``x`` with its assembled ``weight[b]``: one batched matrix product over shifted
    views for ``unfold``, else one grouped convolution (a plain one for a single sample)."""
    if geo.linear:
        return linear_per_sample(x, weight.flatten(2), None)
    if path == "unfold":
        return unfold_conv(x, weight, geo.stride, geo.padding, geo.dilation, geo.groups)
    if not torch.compiler.is_compiling() and x.shape[0] == 1:
        return CONV[geo.dims](x, weight[0], None, geo.stride, geo.padding, geo.dilation, geo.groups)
    return grouped_conv(x, weight, geo.stride, geo.padding, geo.dilation, geo.groups)


class RecomputedWeights(torch.autograd.Function):
    """Per-sample convolution whose backward recomputes the assembled weights.

    Saves only x, the mixture weights (B, m, n) and the warehouse, and works through the batch in
    chunks (one sample at a time on the ``loop`` and ``patches`` paths) so that few assembled weights
    exist at any time. With dW the gradient of a chunk's per-sample weights, split into cells
    (b, m, cell): d(mixture) = dW cells^T and d(cells) = sum_b mixture_b^T dW_b. The backward of the
    paths in :data:`ONE_BY_ONE` takes one of :data:`LOOP_BACKWARDS`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        x: torch.Tensor,
        mixture: torch.Tensor,
        cells: torch.Tensor,
        geo: ConvGeometry,
        path: str,
        loop_backward_form: str,
    ) -> torch.Tensor:
        if path == "fused":
            return fused_conv(x, mixture, cells, geo)
        if path in ("loop", "patches"):
            return loop_conv(x, mixture, cells, geo, by_patches=path == "patches")
        outs = [
            apply_weights(
                x[part], assemble_weights(mixture[part], cells, geo.grid, geo.weight_shape), geo, path
            )
            for part in batch_chunks(x.shape[0], math.prod(geo.weight_shape))
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        x, mixture, cells, ctx.geo, ctx.path, ctx.loop_backward_form = inputs
        ctx.save_for_backward(x, mixture, cells)
        ctx.native = native.is_enabled()  # backward uses the products forward used
        ctx.dtype = output.dtype  # under autocast, what the products ran in; backward runs in it too

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        x, mixture, cells = (t.to(ctx.dtype) for t in saved)
        grad = grad.to(ctx.dtype)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        ops = BackwardOperands(x, mixture, cells, grad, ctx.geo, grad_x, torch.empty_like(mixture))
        with contextlib.nullcontext() if ctx.native else native.enabled(False):
            grad_cells = _backward(ops, ctx.path, ctx.loop_backward_form)
        grads = (grad_x, ops.grad_mixture, grad_cells)
        return (*(g if g is None else g.to(t.dtype) for g, t in zip(grads, saved)), None, None, None)


def _backward(ops: BackwardOperands, path: str, loop_backward_form: str) -> torch.Tensor:
    """The backward of ``path`` in the form asked for; fills grad_x and grad_mixture, returns the
    cells' gradient."""
    if path not in ONE_BY_ONE:
        return _chunked_backward(ops)
    if loop_backward_form == "tiles":
        if native.applies(ops.x, ops.mixture, ops.cells, ops.grad):
            return fused_backward(ops)
        return loop_backward(ops, by_slices=True)
    if loop_backward_form == "mix":
        return mix_backward(ops)
    return loop_backward(ops, by_slices=loop_backward_form == "slices")


def _chunked_backward(ops: BackwardOperands) -> torch.Tensor:
    """Backward of the assembled paths, a chunk of samples at a time; fills grad_x and
    grad_mixture, returns the cells' gradient."""
    x, mixture, cells, grad, geo, grad_x, grad_mixture = ops
    cells2d = cells.reshape(cells.shape[0], -1)
    grad_cells = torch.zeros_like(cells2d)
    for part in batch_chunks(x.shape[0], math.prod(geo.weight_shape)):
        weight = assemble_weights(mixture[part], cells, geo.grid, geo.weight_shape)
        gx, gw = weight_backward(x[part], weight, grad[part], geo, grad_x is not None)
        if grad_x is not None:
            grad_x[part] = gx
        per_cell = split_into_cells(gw, geo.grid, cells.shape[1:])
        cells_gradients(per_cell, mixture[part], cells2d, grad_mixture[part], grad_cells)
    return grad_cells.reshape(cells.shape)


def cells_gradients(
    per_cell: torch.Tensor,
    mixture: torch.Tensor,
    cells2d: torch.Tensor,
    grad_mixture: torch.Tensor,
    grad_cells: torch.Tensor,
) -> None:
    """From the per-sample weight gradients of a chunk of samples split into cells, (b, m, cell
    elements), and their mixture weights (b, m, n): writes their mixture gradient, dW cells^T, into
    ``grad_mixture`` (b, m, n) and adds their cell gradient, sum_b mixture_b^T dW_b, to
    ``grad_cells`` (n, cell elements); ``cells2d`` is the warehouse as (n, cell elements)."""
    num = cells2d.shape[0]
    per_cell = per_cell.reshape(-1, cells2d.shape[1])
    grad_mixture.copy_(torch.matmul(per_cell, cells2d.t()).reshape(mixture.shape[0], -1, num))
    grad_cells.addmm_(mixture.reshape(-1, num).t(), per_cell)
