"""The ``loop`` execution path: one sample at a time, its weight assembled output channel by
output channel in the order a convolution reads fastest, then one plain convolution.
"""

from __future__ import annotations

import math

import torch

from .. import native, tuning
from .assembly import cells_by_output, mix_rows, rows_gradient
from .per_sample import CONV, BackwardOperands, ConvGeometry, patches, weight_backward


def block_rows(mixture: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """(B, m, n) mixture weights as (B, output block, spatial * input block, n): the rows of each
    block of output channels, by column block of the weight."""
    spatial, out_blocks, in_blocks = geo.grid
    rows = mixture.reshape(mixture.shape[0], spatial, out_blocks, in_blocks, -1).transpose(1, 2)
    return rows.reshape(mixture.shape[0], out_blocks, spatial * in_blocks, -1)


def block_rows_to_mixture(rows: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """The inverse of :func:`block_rows`: (B, output block, spatial * input block, n) -> (B, m, n)."""
    spatial, out_blocks, in_blocks = geo.grid
    rows = rows.reshape(rows.shape[0], out_blocks, spatial, in_blocks, -1).transpose(1, 2)
    return rows.reshape(rows.shape[0], spatial * out_blocks * in_blocks, -1)


def _sample_rows(mixture: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """One sample's (m, n) mixture weights as (output block, spatial * input block, n)."""
    return block_rows(mixture.unsqueeze(0), geo)[0]


def _as_weight(products: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """(c, spatial * input block, c_in * k) products of mixture rows and cells -> (c, I/groups, *k)
    weights of c output channels, channels-last for spatially split cells, without a copy."""
    channels, c_in = products.shape[0], geo.weight_shape[1]
    if geo.grid.spatial == 1:
        return products.reshape(channels, *geo.weight_shape[1:])
    return products.reshape(channels, *geo.weight_shape[2:], c_in).movedim(-1, 1)


def _sample_weight(
    mixture: torch.Tensor, by_output: torch.Tensor, geo: ConvGeometry, out: torch.Tensor | None = None
) -> torch.Tensor:
    """One sample's weight from its (m, n) mixture weights, built in the order a convolution reads
    fastest: (output channel, kernel offset, input channel) for spatially split cells, which is a
    channels-last weight, else the plain (output, input, kernel) order. Either way one product per
    output block, ``W[o] = a @ E[o]``, and no reordering copy. ``out``: a buffer from
    :func:`_weight_buffer` to build it in (fresh large allocations cost page faults, per sample)."""
    rows = _sample_rows(mixture, geo)
    if out is None:
        products = [mix_rows(r, by_output) for r in rows]
        return _as_weight(products[0] if len(products) == 1 else torch.cat(products), geo)
    channels = by_output.shape[0]
    for block, block_rows in enumerate(rows):
        mix_rows(block_rows, by_output, out=out[block * channels : (block + 1) * channels])
    return _as_weight(out, geo)


def _autocast(tensor: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(tensor.device.type)


def _weight_buffer(rows: torch.Tensor, by_output: torch.Tensor) -> torch.Tensor | None:
    """Room for the (output block * c, spatial * input block, d) products of :func:`_sample_weight`
    (None under autocast, whose products choose their own type)."""
    if _autocast(by_output):
        return None
    return by_output.new_empty(rows.shape[0] * by_output.shape[0], rows.shape[1], by_output.shape[2])


def _sample_cell_grads(
    grad_weight: torch.Tensor,
    mixture: torch.Tensor,
    by_output: torch.Tensor,
    geo: ConvGeometry,
    grad_by_output: torch.Tensor,
) -> torch.Tensor:
    """The inverse of :func:`_sample_weight` for gradients: from one sample's weight gradient, return
    the gradient of its (m, n) mixture weights and add its share to the cells' (c_out, n, c_in * k)."""
    spatial, out_blocks, in_blocks = geo.grid
    c_out, num = by_output.shape[:2]
    if spatial > 1:
        grad_weight = grad_weight.movedim(1, -1)  # (O, *k, I): the order _sample_weight built
    grad_weight = grad_weight.reshape(out_blocks, c_out, spatial * in_blocks, -1)
    rows = _sample_rows(mixture, geo)
    grad_rows = []
    for o in range(out_blocks):
        grad_rows.append(rows_gradient(grad_weight[o], by_output))
        mix_rows(rows[o].t(), grad_weight[o], out=grad_by_output, accumulate=True)  # += a^T dW per channel
    grad_rows = torch.stack(grad_rows).reshape(out_blocks, spatial, in_blocks, num).transpose(0, 1)
    return grad_rows.reshape(-1, num)


def loop_conv(
    x: torch.Tensor, mixture: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry, by_patches: bool = False
) -> torch.Tensor:
    """Sample by sample: assemble one weight (:func:`_sample_weight`), run one plain convolution, or
    with ``by_patches`` one matrix product with the sample's input patches (:func:`_patches_conv`).

    Without groups, a large weight (a ResNet's last stage) is built and applied a slice of output
    channels at a time, so that the slice, the convolution's copy of it and the cells it reads share
    the cache; the slices go outside, the samples inside, so each slice of cells is read once."""
    if by_patches:
        return _patches_conv(x, mixture, cells_by_output(cells), geo)
    by_output, conv, batch = cells_by_output(cells), CONV[geo.dims], x.shape[0]
    channels = by_output.shape[0]
    per_channel = geo.grid.spatial * geo.grid.in_blocks * by_output.shape[2]
    step = _slice_channels(channels, per_channel, geo)
    if geo.groups > 1 or geo.grid.out_blocks * channels * per_channel <= tuning.LOOP_SLICE_ELEMENTS:
        # the whole weight at once: one convolution per sample, each weight built in the same buffer
        buffer = _weight_buffer(_sample_rows(mixture[0], geo), by_output)
        outs = [
            conv(
                x[b : b + 1],
                _sample_weight(mixture[b], by_output, geo, buffer),
                None,
                geo.stride,
                geo.padding,
                geo.dilation,
                geo.groups,
            )
            for b in range(batch)
        ]
        return outs[0] if batch == 1 else torch.cat(outs)
    rows = [_sample_rows(mixture[b], geo) for b in range(batch)]
    buffer = _weight_buffer(rows[0][:1], by_output[:step])
    slices = []
    for block in range(geo.grid.out_blocks):
        for start in range(0, channels, step):
            part = by_output[start : start + step]
            weight = None if buffer is None else buffer[: part.shape[0]]
            outs = [
                conv(
                    x[b : b + 1],
                    _as_weight(mix_rows(rows[b][block], part, out=weight), geo),
                    None,
                    geo.stride,
                    geo.padding,
                    geo.dilation,
                )
                for b in range(batch)
            ]
            slices.append(outs[0] if batch == 1 else torch.cat(outs))
    return slices[0] if len(slices) == 1 else torch.cat(slices, dim=1)


def _patches_conv(
    x: torch.Tensor, mixture: torch.Tensor, by_output: torch.Tensor, geo: ConvGeometry
) -> torch.Tensor:
    """:func:`loop_conv` with each assembled weight (slice) applied as one matrix product with the
    sample's input patches, ``out_b = W_b @ patches_b^T``: no convolution, so no reorder of every
    new weight into the convolution library's blocked layout (which halves its speed on small maps),
    and the inner dimension is the whole patch (k * c_in). Needs ``groups = 1``."""
    batch, channels = x.shape[0], by_output.shape[0]
    per_channel = geo.grid.spatial * geo.grid.in_blocks * by_output.shape[2]
    step = _slice_channels(channels, per_channel, geo)
    kernel_first = geo.grid.spatial > 1
    rows = [_sample_rows(mixture[b], geo) for b in range(batch)]
    buffer = _weight_buffer(rows[0][:1], by_output[:step])
    slices = [(block, start) for block in range(geo.grid.out_blocks) for start in range(0, channels, step)]

    def apply(sample: int, block: int, start: int, cols: torch.Tensor) -> torch.Tensor:
        part = by_output[start : start + step]
        weight = mix_rows(rows[sample][block], part, out=None if buffer is None else buffer[: part.shape[0]])
        return torch.mm(weight.reshape(part.shape[0], -1), cols.t())

    outs: dict[tuple[int, int, int], torch.Tensor] = {}
    if geo.grid.out_blocks * channels * per_channel <= tuning.LOOP_SLICE_ELEMENTS:
        for b in range(batch):  # one sample's patches at a time, its whole weight applied to them
            cols, size = patches(x[b : b + 1], geo, kernel_first)
            for block, start in slices:
                outs[b, block, start] = apply(b, block, start, cols[0])
    else:  # slices outside, samples inside: each slice of the warehouse is read once for the batch
        cols, size = patches(x, geo, kernel_first)
        for block, start in slices:
            for b in range(batch):
                outs[b, block, start] = apply(b, block, start, cols[b])
    out = torch.stack([torch.cat([outs[b, block, start] for block, start in slices]) for b in range(batch)])
    return out.reshape(batch, geo.weight_shape[0], *size)


def loop_backward(ops: BackwardOperands, by_slices: bool) -> torch.Tensor:
    """Backward of :func:`loop_conv`; fills grad_x and grad_mixture, returns the cells' gradient.
    By slices of output channels (:func:`_backward_by_slices`, which needs ``groups = 1`` and runs
    outside autocast) when ``by_slices``, else sample by sample."""
    x, mixture, cells, grad, geo, grad_x, grad_mixture = ops
    by_output = cells_by_output(cells)
    if by_slices and geo.groups == 1 and not _autocast(by_output):
        grad_by_output = _backward_by_slices(ops, by_output)
        return grad_by_output.transpose(0, 1).reshape(cells.shape)
    buffer = _weight_buffer(_sample_rows(mixture[0], geo), by_output)
    grad_by_output = torch.zeros(by_output.shape, dtype=by_output.dtype, device=by_output.device)
    # on mid-sized maps, each weight gradient as one product over the sample's patches, into one buffer
    by_product = (
        buffer is not None
        and geo.groups == 1
        and native.applies(x, grad, by_output)
        and math.prod(grad.shape[2:]) <= tuning.PRODUCT_MAX_POSITIONS
    )
    grad_weight = torch.empty_like(buffer) if by_product else None
    for b in range(x.shape[0]):
        weight = _sample_weight(mixture[b], by_output, geo, buffer)
        gx, gw = weight_backward(
            x[b : b + 1],
            weight.unsqueeze(0),
            grad[b : b + 1],
            geo,
            grad_x is not None,
            weight_grad=not by_product,
        )
        if by_product:
            gw = _patch_product(x[b : b + 1], grad[b], geo, grad_weight).unsqueeze(0)
        if grad_x is not None:
            grad_x[b] = gx[0]
        grad_mixture[b] = _sample_cell_grads(gw[0], mixture[b], by_output, geo, grad_by_output)
    return grad_by_output.transpose(0, 1).reshape(cells.shape)


def _patch_product(x: torch.Tensor, grad: torch.Tensor, geo: ConvGeometry, out: torch.Tensor) -> torch.Tensor:
    """One sample's weight gradient, ``dY (c_out, L) @ patches (L, k * c_in)``, built in ``out`` in
    the order of :func:`_sample_weight`'s weight and returned as a (c_out, c_in, *k) view of it."""
    cols, _ = patches(x, geo, kernel_first=geo.grid.spatial > 1)
    channels = grad.shape[0]
    mix_rows(grad.reshape(channels, -1), cols, out=out.view(1, channels, -1))
    return _as_weight(out, geo)


def _backward_by_slices(ops: BackwardOperands, by_output: torch.Tensor) -> torch.Tensor:
    """The backward as matrix products over the input patches (B, L, k * c_in), a slice of output
    channels at a time with the samples inside, like :func:`loop_conv`: each slice of the warehouse
    and of its gradient is swept once for the whole batch, and each sample's slice of weight and
    weight gradient stays in cache. Per slice and sample: W = a E (assembly), dX_cols += dY^T W,
    dW = dY X_cols, da += dW E^T and dE += a^T dW. Fills grad_x and grad_mixture, returns dE as
    (c_out, n, d); the first term of each sum is written, not added to zeros. ``by_output`` is the
    warehouse as :func:`.assembly.cells_by_output` orders it."""
    x, mixture, _, grad, geo, grad_x, grad_mixture = ops
    batch, (spatial, out_blocks, in_blocks) = x.shape[0], geo.grid
    channels, num, length = by_output.shape
    with torch.enable_grad():
        inputs = x.detach().requires_grad_(grad_x is not None)
        cols, _ = patches(inputs, geo, kernel_first=spatial > 1)
    grad_cols = torch.empty_like(cols) if grad_x is not None else None
    grad_by_output = torch.empty_like(by_output)
    grad = grad.reshape(batch, geo.weight_shape[0], -1)
    rows = block_rows(mixture, geo)
    grad_rows = mixture.new_zeros(batch, out_blocks, spatial * in_blocks, num)
    step = _slice_channels(channels, spatial * in_blocks * length, geo)
    weight = by_output.new_empty(step, spatial * in_blocks, length)
    grad_weight = torch.empty_like(weight)
    for block in range(out_blocks):
        for start in range(0, channels, step):
            part, grad_part = by_output[start : start + step], grad_by_output[start : start + step]
            size, first = part.shape[0], block * channels + start
            w, gw = weight[:size], grad_weight[:size]
            for b in range(batch):
                mix_rows(rows[b][block], part, out=w)
                dy = grad[b, first : first + size]
                if grad_cols is not None:  # the two products have a small inner dimension too: mix_rows
                    mix_rows(
                        dy.t(), w.reshape(1, size, -1), out=grad_cols[b].unsqueeze(0), accumulate=first > 0
                    )
                mix_rows(dy, cols[b].detach().unsqueeze(0), out=gw.reshape(1, size, -1))
                grad_rows[b, block] += rows_gradient(gw, part)
                mix_rows(rows[b][block].t(), gw, out=grad_part, accumulate=block > 0 or b > 0)
    grad_mixture.copy_(block_rows_to_mixture(grad_rows, geo))
    if grad_x is not None:
        grad_x.copy_(torch.autograd.grad(cols, inputs, grad_cols)[0])
    return grad_by_output


def _slice_channels(channels: int, per_channel: int, geo: ConvGeometry) -> int:
    """Output channels of the warehouse that :func:`loop_conv` builds and applies at once."""
    step = channels
    while geo.groups == 1 and step * per_channel > tuning.LOOP_SLICE_ELEMENTS and step % 32 == 0:
        step //= 2  # halving keeps slices a multiple of 16 channels, which the convolution prefers
    return step
