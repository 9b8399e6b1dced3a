"""Execution: assemble per-sample weights from mixture weights and a warehouse, then convolve.

The reference implementation of KernelWarehouse (Li & Yao, ICML 2024) assembles all B per-sample
weights and runs one convolution with ``groups = groups * B``. :func:`kw_conv` computes the same
function along one of several *paths*, all equal up to float rounding. Each is one
:class:`~.paths.ExecutionPath` in :data:`.paths.REGISTRY`; where they live:

``reference``  (:mod:`.recompute`, :mod:`.assembly`)
    the reference scheme; autograd keeps the B assembled weights alive until backward.
``grouped``  (:mod:`.recompute`)
    the same forward; when a gradient is needed, a custom backward recomputes the weights, so only
    the input, the mixture weights and the warehouse are kept (training memory near the static
    model's), and computes the warehouse and mixture gradients from the weight gradient.
``unfold``  (:mod:`.per_sample`)
    assembled weights applied as one batched matrix product over shifted input views: no
    ``groups = B`` and a graph whose batch size is free, which is what export and tracing need.
``conv``  (:mod:`.paths`, :func:`.assembly.assemble_in_weight_order`; graphs only)
    export with a fixed batch (:func:`.per_sample.fixed_batch_export`): the weights assembled by one
    product straight into the weight's memory order, applied by a plain convolution at batch 1 or
    one of ``groups = B``; ``kernelwarehouse.export_onnx`` builds its fast forms on it.
``mix``  (:mod:`.mix`; layers it does not apply to take ``grouped``)
    never assembles: the input patches are first mixed with the mixture weights, then multiplied by
    the whole warehouse at once, ``out = sum_j E_j (sum_s a_sj x_s)``. More multiply-adds, but one
    dense product; it wins where the map is small and the warehouse is not. Needs ``groups = 1``
    and cells of kernel size 1. In training its backward recomputes the mixed patches.
``loop``  (:mod:`.loop`; eager mode, otherwise ``grouped``)
    one sample at a time: its weight is assembled output channel by output channel, in the order a
    convolution reads fastest, and applied by a plain convolution. Nothing of size B |W| exists.
    Its backward has three forms, chosen like a path: ``loop:slices`` (slices of output channels
    as products over the input patches), ``loop:sample`` (per-sample weight gradients),
    ``loop:mix`` (the mix form, no weight built). On CPU the products with a small inner dimension
    run on the native kernels of :mod:`kernelwarehouse.native`.
``fused``  (:mod:`.fused`; CPU, float32, native kernels, groups 1)
    per block of output channels, a slice of the warehouse is gathered into a tile that stays in
    cache while every sample's weight tiles are mixed from it, and each tile meets the sample's
    input patches at once (:func:`kernelwarehouse.native.fused_conv`): no weight is written to
    memory and the warehouse is read once per call. The output is channels-last. Its own backward
    (``fused:tiles``, the default) builds no weight or weight gradient whole either: the input
    gradient is the same kernel on a transposed view of the warehouse, the mixture and cell
    gradients come from tiles of the weight gradient; the ``loop`` path's forms serve too.
``triton``  (:mod:`.triton_conv`, imported when it first runs; CUDA devices with Triton)
    fused GPU kernels: an implicit-GEMM convolution per sample that assembles each weight tile in
    registers right before using it, so no per-sample weight reaches memory; its backward assembles
    again for the input gradient. 2-d, 1-d and linear layers, not depthwise. ``auto`` takes it only
    where timing on the GPU finds it fastest; the fixed rule does not take it.

``auto`` (the default) is resolved per call by :func:`.paths.resolve`: measured on this machine
the first time a layer geometry is seen (:mod:`.choice`), or by the fixed rule
(:func:`.paths.rule_choice`) with ``KERNELWAREHOUSE_PATH_CHOICE=rule`` and whenever a graph is
traced, exported or compiled (``unfold`` there, so the graph serves every batch size, or ``conv``
where an export fixes the batch).
"""

from __future__ import annotations

from typing import ContextManager

import torch

from .assembly import assemble_weights, split_into_cells
from .choice import get_path_choice, measured, temporarily
from .paths import (
    REGISTRY,
    LayerCall,
    candidates,
    check_choice,
    choose_path,
    fall_back,
    rule_choice,
    run_choice,
    split_choice,
)
from .per_sample import ConvGeometry, conv_per_sample, linear_per_sample, output_epilogue

__all__ = [
    "PATHS",
    "ConvGeometry",
    "assemble_weights",
    "choose_path",
    "conv_per_sample",
    "execution_path",
    "get_execution_path",
    "kw_conv",
    "linear_per_sample",
    "resolve_path",
    "set_execution_path",
    "split_into_cells",
]

#: The paths one can ask for; a path with several backward forms also takes ``"path:form"``.
PATHS = ("auto", *REGISTRY)

_path = "auto"


def set_execution_path(path: str) -> str:
    """Use ``path`` (one of :data:`PATHS`, or e.g. ``"loop:slices"``) for every KernelWarehouse
    layer; returns the previous one."""
    global _path
    if path != "auto":
        check_choice(path)
    previous, _path = _path, path
    return previous


def get_execution_path() -> str:
    return _path


def execution_path(path: str) -> ContextManager[None]:
    """Context manager form of :func:`set_execution_path`."""
    return temporarily(set_execution_path, path)


def resolve_path(
    x: torch.Tensor, mixture: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry, path: str | None = None
) -> str:
    """The choice (a path, and for ``loop`` in training its backward form) that runs this call:
    ``path`` (default: the global setting) where it applies, ``auto`` resolved as the module
    docstring says."""
    return _resolve(LayerCall.of(x, mixture, cells, geo), x, mixture, cells, geo, path or _path)


def _resolve(
    call: LayerCall, x: torch.Tensor, mixture: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry, path: str
) -> str:
    if path != "auto":
        return fall_back(path, call)
    if call.graph or get_path_choice() == "rule":
        return rule_choice(call)

    def runner(choice: str):
        if not call.grad:

            def infer() -> None:
                with torch.no_grad():
                    run_choice(choice, x, mixture, cells, geo, False, call)

            return infer

        def train() -> None:  # on detached copies: nothing reaches the model's gradients
            with torch.enable_grad():
                inputs = [t.detach().requires_grad_(t.requires_grad) for t in (x, mixture, cells)]
                out = run_choice(choice, *inputs, geo, True, call)
                wanted = [t for t in inputs if t.requires_grad]
                torch.autograd.grad(out, wanted, torch.ones_like(out))

        return train

    return measured(call, candidates(call), runner, lambda: rule_choice(call))


def kw_conv(
    x: torch.Tensor,
    mixture: torch.Tensor,
    cells: torch.Tensor,
    bias: torch.Tensor | None,
    geo: ConvGeometry,
    path: str | None = None,
    scale: torch.Tensor | None = None,
    *,
    return_choice: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, str]:
    """A KernelWarehouse convolution (or linear, ``geo.linear``) along ``path`` (default: the
    global setting, see :func:`set_execution_path`). All paths compute the same function. ``scale``
    (C_out,) multiplies each output channel before the bias is added: a BatchNorm folded into the
    layer (:func:`kernelwarehouse.fuse_for_inference`). With ``return_choice``, returns the output
    and the choice that ran it (see :func:`resolve_path`), resolved once.

    A path that ``folds_epilogue`` (the export path ``conv``, graphs only) applies the scale and
    the bias itself; after any other they are applied to the output, in one pass."""
    call = LayerCall.of(x, mixture, cells, geo)
    choice = _resolve(call, x, mixture, cells, geo, path or _path)
    path_ = REGISTRY[split_choice(choice)[0]]
    if path_.folds_epilogue:  # graphs only: no backward form, no native kernels
        out = path_.forward(x, mixture, cells, geo, "", False, scale=scale, bias=bias)
    else:
        out = run_choice(choice, x, mixture, cells, geo, call.grad and not call.graph, call)
        out = output_epilogue(out, bias, scale, geo.dims)
    return (out, choice) if return_choice else out
