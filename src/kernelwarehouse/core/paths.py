"""The execution paths of a KernelWarehouse convolution: one registry, one resolver.

A path is an :class:`ExecutionPath` (what it supports, how it runs forward, which backward forms it
has), registered in :data:`REGISTRY`. A *choice* names a path and, for a path with several
backward forms, one of them: ``"loop:slices"``; a bare ``"loop"`` lets the fixed rule pick the
form. A suffix ``@torch`` runs the choice on PyTorch's products in place of the native kernels.
:func:`.execution.resolve_path` turns the requested path of one call (a :class:`LayerCall`) into a
choice: ``auto`` among :func:`candidates` measured (:mod:`.choice`) or, with
``KERNELWAREHOUSE_PATH_CHOICE=rule`` and while a graph is built, taken from :func:`rule_choice`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .. import native, tuning
from .assembly import assemble_in_weight_order, assemble_weights, cells_by_rows
from .fused import fused_conv, fused_supported
from .loop import loop_conv
from .mix import mix_conv, mix_is_cheap, mix_supported
from .per_sample import (
    CONV,
    ConvGeometry,
    add_bias,
    building_graph,
    exporting,
    fixed_graph_batch,
    graph_shared,
    grouped_conv,
    linear_per_sample,
    scale_and_shift,
)
from .recompute import LOOP_BACKWARDS, RecomputedWeights, apply_weights


class LayerCall(NamedTuple):
    """What the choice of a path depends on: one call of one layer, without its tensors' values."""

    geo: ConvGeometry
    cells_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    dtype: str  # what the products run in (autocast's type where it is on)
    device: str  # "cpu:<threads>t:<native kernels variant or 'pytorch'>", "cuda", ...
    grad: bool  # a gradient will be computed (training)
    graph: bool  # traced, scripted, exported or compiled: eager-only code may not run

    @classmethod
    def of(cls, x: torch.Tensor, mixture: torch.Tensor, cells: torch.Tensor, geo: ConvGeometry) -> LayerCall:
        grad = torch.is_grad_enabled() and (x.requires_grad or mixture.requires_grad or cells.requires_grad)
        kind, graph = x.device.type, building_graph()
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        if graph:
            device = kind
        elif kind == "cpu":
            kernels = native.variant() if native.applies(cells.detach()) else None
            device = f"cpu:{torch.get_num_threads()}t:{kernels or 'pytorch'}"
        else:
            device = str(x.device)
        return cls(
            geo, tuple(cells.shape), tuple(x.shape), str(dtype).removeprefix("torch."), device, grad, graph
        )

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    @property
    def out_size(self) -> int:
        """Output positions L per sample (tokens for a linear layer)."""
        geo = self.geo
        if geo.linear:
            return math.prod(self.input_shape[1:-1])
        k = geo.weight_shape[2:]
        size = self.input_shape[2:]
        return math.prod(
            [
                (size[i] + 2 * geo.padding[i] - geo.dilation[i] * (k[i] - 1) - 1) // geo.stride[i] + 1
                for i in range(geo.dims)
            ]
        )

    def key(self) -> str:
        """A stable text for this call, the key of the measured choices (in memory, on disk, in
        checkpoints)."""
        geo = self.geo
        parts = [
            f"grid={geo.grid}",
            f"weight={geo.weight_shape}",
            f"stride={geo.stride}",
            f"padding={geo.padding}",
            f"dilation={geo.dilation}",
            f"groups={geo.groups}",
            f"cells={self.cells_shape}",
            f"input={self.input_shape}",
            self.dtype,
            self.device,
            "train" if self.grad else "infer",
        ]
        return "|".join(p.replace(" ", "") for p in parts)


Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ConvGeometry, str, bool], torch.Tensor]


@dataclass(frozen=True)
class ExecutionPath:
    """One way to run a KernelWarehouse convolution. ``forward(x, mixture, cells, geo, backward,
    lean)`` returns the output without bias; ``lean`` asks for a backward that keeps little
    (training outside graph building), ``backward`` is one of ``backwards`` or ``""``. A path that
    ``folds_epilogue`` takes ``scale=`` and ``bias=`` as well (per output channel, each may be None)
    and returns the output with both applied (``conv``: the scale in the assembled weights where that
    is cheaper); after other paths :func:`.execution.kw_conv` applies them to the output."""

    name: str
    summary: str
    supports: Callable[[LayerCall], bool]
    forward: Forward
    backwards: tuple[str, ...] = ()
    folds_epilogue: bool = False
    #: the backward form where a training call names none (default: :func:`loop_backward_rule`)
    default_backward: Callable[[LayerCall], str] | None = None
    #: the backward forms ``auto`` times (default: all of ``backwards``); the others run when asked for
    timed_backwards: tuple[str, ...] | None = None

    def backward_supported(self, form: str, call: LayerCall) -> bool:
        if not self.backwards:
            return False
        if form == "slices":
            return call.geo.groups == 1
        if form == "mix":
            return mix_supported(call.geo, call.cells_shape)
        return form in ("sample", "tiles")


def _reference(x, mixture, cells, geo, backward, lean):
    return apply_weights(x, assemble_weights(mixture, cells, geo.grid, geo.weight_shape), geo, "grouped")


def _assembled(path: str) -> Forward:
    def forward(x, mixture, cells, geo, backward, lean):
        if lean:
            return RecomputedWeights.apply(x, mixture, cells, geo, path, "")
        return apply_weights(x, assemble_weights(mixture, cells, geo.grid, geo.weight_shape), geo, path)

    return forward


def _mix(x, mixture, cells, geo, backward, lean):
    if lean:  # the mixed features are recomputed in backward (activation checkpointing)
        return checkpoint(mix_conv, x, mixture, cells, geo, use_reentrant=False, preserve_rng_state=False)
    return mix_conv(x, mixture, cells, geo)


def _one_by_one(path: str) -> Forward:
    def forward(x, mixture, cells, geo, backward, lean):
        if lean:
            return RecomputedWeights.apply(x, mixture, cells, geo, path, backward)
        return loop_conv(x, mixture, cells, geo, by_patches=path == "patches")

    return forward


def _fused(x, mixture, cells, geo, backward, lean):
    if lean:
        return RecomputedWeights.apply(x, mixture, cells, geo, "fused", backward)
    return fused_conv(x, mixture, cells, geo, keep=True)


def _triton(x, mixture, cells, geo, backward, lean):
    from .triton_conv import triton_conv  # imports Triton: only once the path runs

    return triton_conv(x, mixture, cells, geo)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton imports here (asked only for calls on a CUDA device)."""
    try:
        import triton.language  # noqa: F401
    except Exception:  # not installed, or installed without a working backend
        return False
    return True


def triton_supported(call: LayerCall) -> bool:
    """The ``triton`` path: eager calls on a CUDA device with Triton, 2-d and 1-d convolutions and
    linear layers, not depthwise (one input channel per group: the other paths serve those)."""
    return (
        call.device.startswith("cuda")
        and not call.graph
        and call.geo.dims <= 2
        and call.geo.weight_shape[1] > 1
        and triton_available()
    )


def _conv_graph(x, mixture, cells, geo, backward, lean, scale=None, bias=None):
    """The ``conv`` path: graphs only, so no backward and no native kernels. The scale goes where
    it costs fewer multiplies: into the weight (|W| per sample) or onto the output (C_out L)."""
    by_row = graph_shared(cells, "cells_by_rows", cells_by_rows) if geo.grid.spatial > 1 else None
    weight = assemble_in_weight_order(mixture, cells, geo.grid, geo.weight_shape, by_row)
    positions = LayerCall.of(x, mixture, cells, geo).out_size
    if scale is not None and math.prod(geo.weight_shape[1:]) <= positions:
        weight = weight * scale.to(weight.dtype).reshape(1, -1, *([1] * (weight.dim() - 2)))
        scale = None
    inner = None if bias is None or scale is not None else bias.to(weight.dtype)  # the bias inside
    if geo.linear:
        out = linear_per_sample(x, weight.flatten(2), inner)
    elif fixed_graph_batch() == 1:  # a plain convolution
        out = CONV[geo.dims](
            x, weight.reshape(geo.weight_shape), inner, geo.stride, geo.padding, geo.dilation, geo.groups
        )
    else:
        out = add_bias(grouped_conv(x, weight, geo.stride, geo.padding, geo.dilation, geo.groups), inner)
    return out if scale is None else scale_and_shift(out, scale, bias, geo.dims)


REGISTRY: dict[str, ExecutionPath] = {}


def register(path: ExecutionPath) -> ExecutionPath:
    """Add ``path`` to :data:`REGISTRY` (a new path then takes part in the measured choice)."""
    if path.name in REGISTRY or path.name == "auto" or ":" in path.name:
        raise ValueError(f"execution path name {path.name!r} is taken or invalid")
    REGISTRY[path.name] = path
    return path


register(
    ExecutionPath(
        "reference",
        "the reference scheme: B assembled weights, one convolution with groups = B; autograd "
        "keeps the weights for backward",
        lambda call: True,
        _reference,
    )
)
register(
    ExecutionPath(
        "grouped",
        "the same forward; in training a backward that recomputes the weights a chunk of samples at a time",
        lambda call: True,
        _assembled("grouped"),
    )
)
register(
    ExecutionPath(
        "unfold",
        "assembled weights applied as one batched matrix product over shifted input views; the "
        "batch stays free (export, tracing)",
        lambda call: True,
        _assembled("unfold"),
    )
)
register(
    ExecutionPath(
        "conv",
        "export of a fixed batch: weights assembled by one product in the weight's memory order, "
        "applied by a plain (batch 1) or grouped convolution; a scale per output channel (a folded "
        "BatchNorm) goes into the weights, the bias into the convolution",
        lambda call: call.graph and (call.geo.linear or fixed_graph_batch() is not None),
        _conv_graph,
        folds_epilogue=True,
    )
)
register(
    ExecutionPath(
        "mix",
        "no assembly: input patches mixed by the mixture weights, then one product with the whole "
        "warehouse (groups 1, cells of kernel size 1)",
        lambda call: mix_supported(call.geo, call.cells_shape),
        _mix,
    )
)
register(
    ExecutionPath(
        "loop",
        "one sample at a time, its weight assembled in cache and applied by a plain convolution (eager mode)",
        lambda call: not call.geo.linear and not call.graph,
        _one_by_one("loop"),
        LOOP_BACKWARDS,
    )
)
register(
    ExecutionPath(
        "patches",
        "as loop, each weight applied as one matrix product with the sample's input patches "
        "(eager mode, groups 1)",
        lambda call: not call.geo.linear and call.geo.groups == 1 and not call.graph,
        _one_by_one("patches"),
        LOOP_BACKWARDS,
    )
)
register(
    ExecutionPath(
        "fused",
        "each weight assembled a tile at a time in cache by the native kernels and applied at once to "
        "the sample's patches; the warehouse read once per call (CPU, float32, eager mode, groups 1); "
        "its own backward (``tiles``) builds no weight gradient whole either",
        lambda call: fused_supported(call.geo, call.cells_shape, call.dtype, call.device) and not call.graph,
        _fused,
        ("tiles", *LOOP_BACKWARDS),
        default_backward=lambda call: "tiles",
        timed_backwards=("tiles",),  # the loop forms behind this forward: what patches:* time already
    )
)
register(
    ExecutionPath(
        "triton",
        "fused GPU kernels: each weight tile assembled on chip and used at once by an implicit-GEMM "
        "convolution, in backward too (CUDA with Triton; 2-d, 1-d and linear, not depthwise)",
        triton_supported,
        _triton,
    )
)


#: The suffix of a choice that runs with PyTorch's products in place of the native kernels.
TORCH_PRODUCTS = "@torch"


def split_choice(choice: str) -> tuple[str, str, bool]:
    """``"loop:slices@torch"`` -> ``("loop", "slices", True)``: the path, its backward form (or
    ``""``), and whether PyTorch's products replace the native kernels (forward and backward)."""
    torch_products = choice.endswith(TORCH_PRODUCTS)
    name, _, backward = choice.removesuffix(TORCH_PRODUCTS).partition(":")
    return name, backward, torch_products


def check_choice(choice: str) -> str:
    """``choice`` if it names a registered path (and backward form), else ValueError."""
    name, backward, _ = split_choice(choice)
    if name not in REGISTRY or (backward and backward not in REGISTRY[name].backwards):
        forms = [f"{p.name}:{b}" for p in REGISTRY.values() for b in p.backwards]
        raise ValueError(
            f"execution path must be 'auto', one of {tuple(REGISTRY)} or a path with its "
            f"backward form, one of {tuple(forms)}, each optionally with {TORCH_PRODUCTS!r} "
            f"(PyTorch's products in place of the native kernels); got {choice!r}"
        )
    return choice


def candidates(call: LayerCall) -> list[str]:
    """The choices the measured ``auto`` times for ``call``. Pruned by shape only where a candidate
    cannot win: ``reference`` (``grouped`` runs the same forward and keeps far less for backward),
    ``unfold`` for a linear layer (the same product as ``grouped``); in training a path that would
    hold more than :data:`kernelwarehouse.tuning.CHUNK_ELEMENTS` at once (:func:`_workspace`), which
    keeps training memory near the static model's; ``mix`` and ``loop:mix`` where
    they cost more than :data:`kernelwarehouse.tuning.MIX_PRUNE_ADVANTAGE` times the multiply-adds
    of assembling, ``loop:slices`` on maps larger than
    :data:`kernelwarehouse.tuning.SLICES_PRUNE_POSITIONS`; of a path's backward forms, those in its
    ``timed_backwards`` (``fused:tiles``: the ``loop`` forms behind the ``fused`` forward would time
    what ``patches`` times already)."""
    found = []
    for path in REGISTRY.values():
        if path.name == "reference" or not path.supports(call):
            continue
        if call.grad and _workspace(path.name, call) > tuning.CHUNK_ELEMENTS:
            continue
        if path.name == "unfold" and call.geo.linear:
            continue
        if path.name == "mix" and not mix_is_cheap(
            call.geo, call.cells_shape, call.out_size, tuning.MIX_PRUNE_ADVANTAGE
        ):
            continue
        if call.grad and path.backwards:
            found += [
                f"{path.name}:{form}"
                for form in path.timed_backwards or path.backwards
                if path.backward_supported(form, call) and not _pruned_backward(form, call)
            ]
        else:
            found.append(path.name)
    if call.device.startswith("cpu") and not call.device.endswith(":pytorch"):
        # the native kernels against PyTorch's products, which may be the faster (MKL on Intel CPUs)
        found += [f"{choice}{TORCH_PRODUCTS}" for choice in found if not choice.startswith(("mix", "fused"))]
    return found


def _workspace(name: str, call: LayerCall) -> int:
    """Elements a path holds at once beyond what every path holds, in training: the mixed features
    of ``mix``, the input patches of ``unfold`` and ``patches`` (the other paths work in chunks of
    at most :data:`kernelwarehouse.tuning.CHUNK_ELEMENTS`)."""
    geo, batch, positions = call.geo, call.batch, call.out_size
    patch = math.prod(geo.weight_shape[1:]) * geo.groups  # inputs per output position, all groups
    if name == "mix":
        return batch * geo.grid.out_blocks * call.cells_shape[2] * call.cells_shape[0] * positions
    if name == "unfold" and math.prod(geo.weight_shape[2:]) > 1:
        return batch * patch * positions
    if name == "fused":
        return batch * patch * positions
    if name == "patches":
        whole = (
            math.prod(geo.weight_shape) <= tuning.LOOP_SLICE_ELEMENTS
        )  # then one sample's patches at a time
        return (1 if whole else batch) * patch * positions
    return 0


def _pruned_backward(form: str, call: LayerCall) -> bool:
    if form == "mix":
        return not mix_is_cheap(call.geo, call.cells_shape, call.out_size, tuning.MIX_PRUNE_ADVANTAGE)
    return form == "slices" and call.out_size > tuning.SLICES_PRUNE_POSITIONS


def rule_choice(call: LayerCall) -> str:
    """The fixed rule: the choice ``auto`` makes with ``KERNELWAREHOUSE_PATH_CHOICE=rule`` and while a
    graph is built; deterministic, from shapes only (its thresholds: :mod:`kernelwarehouse.tuning`).

    Under export or tracing ``conv`` for a linear layer and where the graph's batch is fixed
    (:func:`.per_sample.fixed_batch_export`), else ``unfold`` (a batch-free graph); compiled graphs
    take ``unfold`` where the rule says ``grouped``. Otherwise :func:`choose_path`, and for ``loop``
    in training the backward form: by slices on maps of at most
    :data:`.tuning.SLICED_MAX_POSITIONS` positions without groups, the mix form where that is cheap,
    else by sample."""
    if exporting():
        return "conv" if REGISTRY["conv"].supports(call) else "unfold"
    compiling = torch.compiler.is_compiling()
    device_type = call.device.split(":", 1)[0]
    path = choose_path(call.geo, call.cells_shape, call.batch, call.out_size, device_type)
    if path == "grouped" and not call.geo.linear and compiling:
        return "unfold"
    if path == "loop" and call.grad:
        return f"loop:{loop_backward_rule(call)}"
    return path


def loop_backward_rule(call: LayerCall) -> str:
    """The rule's backward form of the ``loop`` path (see :func:`rule_choice`)."""
    positions = call.out_size
    if call.geo.groups == 1 and positions <= tuning.SLICED_MAX_POSITIONS:
        return "slices"
    if mix_is_cheap(call.geo, call.cells_shape, positions):
        return "mix"
    return "sample"


def choose_path(
    geo: ConvGeometry, cells_shape: Sequence[int], batch: int, out_size: int, device_type: str = "cpu"
) -> str:
    """The rule's path for one layer, from its shape (``out_size``: output positions L).

    Per sample, assembling costs n |W| multiply-adds and convolving L |W|; ``mix`` costs
    n L |W| / (spatial blocks * input blocks). A pointwise convolution of a batch is one batched
    matrix product (``unfold``). On CPU, a layer with work enough per sample assembles one sample at
    a time (``loop``). Depthwise layers and small ones, and every layer off CPU, take ``mix`` where
    the map is small against the warehouse and ``grouped`` otherwise.
    """
    if geo.linear:
        return "grouped"
    compiling = torch.compiler.is_compiling()
    several = compiling or batch > 1  # compiled graphs serve every batch size
    if several and math.prod(geo.weight_shape[2:]) == 1:
        return "unfold"
    if device_type == "cpu" and not compiling:
        work = (cells_shape[0] + out_size) * math.prod(geo.weight_shape)
        if geo.weight_shape[1] >= tuning.LOOP_MIN_INPUTS and work >= tuning.LOOP_MIN_MACS:
            return "loop"
    if several and mix_is_cheap(geo, cells_shape, out_size):
        return "mix"
    return "grouped"


def run_choice(
    choice: str,
    x: torch.Tensor,
    mixture: torch.Tensor,
    cells: torch.Tensor,
    geo: ConvGeometry,
    lean: bool,
    call: LayerCall,
) -> torch.Tensor:
    """Run ``choice`` (already resolved for ``call``): the output without bias."""
    name, backward, torch_products = split_choice(choice)
    path = REGISTRY[name]
    if lean and path.backwards and not backward:
        backward = (path.default_backward or loop_backward_rule)(call)
    with native.enabled(False) if torch_products else contextlib.nullcontext():
        return path.forward(x, mixture, cells, geo, backward, lean)


def fall_back(choice: str, call: LayerCall) -> str:
    """A requested path where it applies; where not (``mix`` with groups, ``loop`` while a graph is
    built or on a linear layer), ``grouped``; an unsupported backward form becomes the rule's."""
    name, backward, torch_products = split_choice(choice)
    path = REGISTRY[name]
    suffix = TORCH_PRODUCTS if torch_products else ""
    if not path.supports(call):
        return "grouped" + suffix
    if backward and not path.backward_supported(backward, call):
        return name + suffix
    return choice
