"""Per-sample convolution: sample b of a batch convolved with its own weight, as one grouped
convolution or one batched matrix product over shifted input views, and the gradients of both.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import tuning
from .plan import CellGrid


CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvGeometry(NamedTuple):
    """Everything of a per-sample convolution that is not a tensor. Without stride, padding and
    dilation it is a linear layer (:attr:`linear`): weight (C_out, C_in, 1) applied to each token."""

    grid: CellGrid
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def linear(self) -> bool:
        """A linear layer (``KWLinear``), not a convolution."""
        return not self.stride

    @property
    def dims(self) -> int:
        """Spatial dimensions of the convolution; 0 for a linear layer."""
        return 0 if self.linear else len(self.weight_shape) - 2


class BackwardOperands(NamedTuple):
    """What a backward of a KernelWarehouse convolution works on: the input ``x``, the mixture
    weights (B, m, n), the cells, the output's gradient and the geometry; and the buffers it fills,
    ``grad_x`` (None where x needs no gradient) and ``grad_mixture``. It returns the cells' gradient."""

    x: torch.Tensor
    mixture: torch.Tensor
    cells: torch.Tensor
    grad: torch.Tensor
    geo: ConvGeometry
    grad_x: Optional[torch.Tensor]
    grad_mixture: torch.Tensor


def conv_nd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> torch.Tensor:
    """``F.conv1d``, ``F.conv2d`` or ``F.conv3d``, as the weight (C_out, C_in / groups, *k) says;
    TorchScript-compatible (eager callers may also pass ``"same"`` or ``"valid"`` as padding)."""
    dims = weight.dim() - 2
    if dims == 1:
        return F.conv1d(x, weight, bias, stride, padding, dilation, groups)
    if dims == 2:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return F.conv3d(x, weight, bias, stride, padding, dilation, groups)


def grouped_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> torch.Tensor:
    """Sample b of ``x`` with ``weight[b]`` as one convolution of ``groups * B`` groups.
    TorchScript-compatible: the scripted layers run it (see ``KWLayer``)."""
    batch = x.shape[0]
    out = conv_nd(
        x.reshape([1, -1] + list(x.shape[2:])),
        weight.reshape([-1] + list(weight.shape[2:])),
        None,
        stride,
        padding,
        dilation,
        groups * batch,
    )
    return out.reshape([batch, -1] + list(out.shape[2:]))


def shifted_views(
    x: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    channels_last: bool = False,
    kernel_first: bool = False,
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The input at every kernel offset, stacked: (B, C, K, *out) with K = prod(kernel) in row-major
    kernel order (what ``F.unfold`` gives, for 1-d and 2-d), or (B, *out, C, K) with ``channels_last``,
    (B, *out, K, C) with ``kernel_first`` as well.

    Built from strided slices rather than ``im2col``, which is slow on CPU and exports to ONNX poorly.
    """
    dims = len(kernel)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    size = tuple((x.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(dims))
    views = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = [slice(None), slice(None)] + [
            slice(o * d, o * d + (n - 1) * s + 1, s) for o, d, n, s in zip(offset, dilation, size, stride)
        ]
        view = x[tuple(index)]
        views.append(view.movedim(1, -1) if channels_last else view)
    return torch.stack(views, dim=(-2 if kernel_first else -1) if channels_last else 2), size


def unfold_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Per-sample convolution as a batched matrix product over shifted input views."""
    batch, c_out = weight.shape[:2]
    patch = math.prod(weight.shape[2:])  # explicit sizes: a batch left free by the compiler divides nothing
    cols, size = shifted_views(x, weight.shape[3:], stride, padding, dilation)
    cols = cols.reshape(batch, groups, patch, math.prod(size))
    out = torch.matmul(weight.reshape(batch, groups, c_out // groups, patch), cols)
    return out.reshape(batch, c_out, *size)


def add_bias(out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``out`` plus a bias per output channel (axis 1)."""
    if bias is None:
        return out
    return out + bias.to(out.dtype).reshape([1, -1] + [1] * (out.dim() - 2))


def scale_and_shift(
    out: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], dims: int
) -> torch.Tensor:
    """``out * scale + bias`` per output channel (on axis 1, or the last for ``dims == 0``), one pass."""
    shape = [-1] if dims == 0 else [1, -1] + [1] * dims
    scale = scale.to(out.dtype).reshape(shape)
    shift = torch.zeros_like(scale) if bias is None else bias.to(out.dtype).reshape(shape)
    return torch.addcmul(shift, out, scale)


def output_epilogue(
    out: torch.Tensor, bias: Optional[torch.Tensor], scale: Optional[torch.Tensor], dims: int
) -> torch.Tensor:
    """A layer's per-channel scale (a folded BatchNorm) and bias applied to its output, on axis 1 of
    a convolution's or the last axis of a linear layer's (``dims == 0``). TorchScript-compatible."""
    if scale is not None:
        return scale_and_shift(out, scale, bias, dims)
    if bias is None:
        return out
    if dims == 0:
        return out + bias.to(out.dtype)
    return add_bias(out, bias)


def exporting() -> bool:
    """Whether a graph is being traced, scripted or exported (its batch size must stay free)."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


class _FixedBatchExport:
    """The export in progress of a graph with a fixed batch size (see :func:`fixed_batch_export`)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.shared: dict[tuple[int, str], torch.Tensor] = {}  # graph values built once per export


_fixed_export: _FixedBatchExport | None = None


@contextlib.contextmanager
def fixed_batch_export(batch: int) -> Iterator[None]:
    """While exporting or tracing inside this context, the graph is built for batches of ``batch``
    samples only: per-sample weights may be applied by a plain (``batch == 1``) or grouped
    convolution, whose ``groups`` is fixed in the graph."""
    global _fixed_export
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"a fixed export batch must be a positive int, got {batch!r}")
    previous, _fixed_export = _fixed_export, _FixedBatchExport(batch)
    try:
        yield
    finally:
        _fixed_export = previous


def fixed_graph_batch() -> int | None:
    """The batch size of the graph being exported, or None when it is free (or nothing is exported)."""
    return _fixed_export.batch if _fixed_export is not None and exporting() else None


def graph_shared(
    source: torch.Tensor, name: str, build: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``build(source)``, built once per fixed-batch export and reused by every layer that asks for
    it (a warehouse shared by several layers gets one transposed copy in the graph, not one each)."""
    if _fixed_export is None or not exporting():
        return build(source)
    key = (id(source), name)
    if key not in _fixed_export.shared:
        _fixed_export.shared[key] = build(source)
    return _fixed_export.shared[key]


def building_graph() -> bool:
    """Whether a graph is being traced, scripted, exported or compiled: then every path runs without
    eager-only code (per-sample loops, native kernels, custom backward) and with a free batch."""
    return exporting() or torch.compiler.is_compiling()


def conv_per_sample(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int] | str,
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Convolve sample b of ``x`` with ``weight[b]`` (B, C_out, C_in/groups, *k) in one call.

    One grouped convolution (a plain one for a single sample); under export, tracing or
    ``torch.compile`` the batch-free matrix-product form, so graphs hold for every batch size.
    """
    free_batch = building_graph()
    if free_batch and not isinstance(padding, str):
        return add_bias(unfold_conv(x, weight, stride, padding, dilation, groups), bias)
    if not free_batch and x.shape[0] == 1:
        return CONV[weight.dim() - 3](x, weight[0], bias, stride, padding, dilation, groups)
    return add_bias(grouped_conv(x, weight, stride, padding, dilation, groups), bias)


def linear_per_sample(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (B, T, C_in) with weight (B, C_out, C_in) -> (B, T, C_out). TorchScript-compatible."""
    out = torch.matmul(x, weight.transpose(1, 2))
    return out if bias is None else out + bias.to(out.dtype)


def weight_backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    grad: torch.Tensor,
    geo: ConvGeometry,
    input_grad: bool,
    weight_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of a per-sample convolution (or linear) with respect to x and the B weights."""
    if geo.linear:
        flat = weight.flatten(2)
        grad_x = torch.matmul(grad, flat) if input_grad else None
        return grad_x, torch.matmul(grad.transpose(1, 2), x).reshape(weight.shape) if weight_grad else None
    batch = x.shape[0]
    merged = lambda t: t.reshape(1, -1, *t.shape[2:])  # noqa: E731
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        merged(grad),
        merged(x),
        weight.reshape(-1, *weight.shape[2:]),
        None,
        list(geo.stride),
        list(geo.padding),
        list(geo.dilation),
        False,
        [0] * geo.dims,
        geo.groups * batch,
        [input_grad, weight_grad, False],
    )
    return (grad_x.reshape(x.shape) if input_grad else None), (
        grad_w.reshape(weight.shape) if weight_grad else None
    )


def patches(x: torch.Tensor, geo: ConvGeometry, kernel_first: bool) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The input patches of a convolution as a (B, L, k * c_in) matrix per sample, in the column
    order of a channels-last weight (c_out, *k, c_in) with ``kernel_first``, else of (c_out, c_in, *k);
    and the output size. Differentiable: the gradient of the patches folds back onto x."""
    cols, size = shifted_views(
        x,
        geo.weight_shape[2:],
        geo.stride,
        geo.padding,
        geo.dilation,
        channels_last=True,
        kernel_first=kernel_first,
    )
    return cols.reshape(x.shape[0], math.prod(size), -1), size


def batch_chunks(batch: int, weight_numel: int) -> list[slice]:
    size = max(1, min(batch, tuning.CHUNK_ELEMENTS // max(weight_numel, 1)))
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]
