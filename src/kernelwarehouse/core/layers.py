"""Drop-in KernelWarehouse layers: ``KWConv1d``, ``KWConv2d``, ``KWConv3d`` and ``KWLinear``.

A layer built on its own plans a private warehouse (``KWConv2d(64, 64, 3, cell_num_ratio=2)``);
layers of a model that share warehouses are built from a :class:`~kernelwarehouse.core.plan.Plan`
with ``plan=`` and ``warehouse=`` (see :mod:`kernelwarehouse.core.build`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _ntuple

from .attention import KWAttention
from .assembly import assemble_by_product
from .execution import ConvGeometry, assemble_weights, kw_conv
from .per_sample import building_graph, grouped_conv, linear_per_sample, output_epilogue
from .plan import LayerPlan, LayerSpec, plan_warehouses
from .warehouse import Warehouse

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def checked_padding(padding: int | Sequence[int] | str, stride: tuple[int, ...]) -> tuple[int, ...] | str:
    """A convolution's padding, checked: ``"same"`` (unstrided only), ``"valid"``, or one amount per
    spatial dimension (``len(stride)`` of them) from an int or a sequence."""
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
        if padding == "same" and any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions")
        return padding
    return tuple(_ntuple(len(stride))(padding))


def conv_repr(layer: nn.Module) -> str:
    """The ``extra_repr`` head of a convolution as ``nn.Conv`` writes it: channels, kernel, stride,
    padding, and dilation, groups and padding mode where they are not the defaults."""
    s = (
        f"{layer.in_channels}, {layer.out_channels}, kernel_size={layer.kernel_size}, "
        f"stride={layer.stride}, padding={layer.padding}"
    )
    if any(d != 1 for d in layer.dilation):
        s += f", dilation={layer.dilation}"
    if layer.groups != 1:
        s += f", groups={layer.groups}"
    if getattr(layer, "padding_mode", "zeros") != "zeros":
        s += f", padding_mode={layer.padding_mode!r}"
    return s


class KWLayer(nn.Module):
    """What every KernelWarehouse layer has: a plan, a warehouse, an attention branch, a bias."""

    def __init__(
        self,
        spec: LayerSpec,
        bias: bool,
        plan: LayerPlan | None,
        warehouse: Warehouse | None,
        ratios: dict[str, Any],
    ) -> None:
        super().__init__()
        if (plan is None) != (warehouse is None):
            raise ValueError("pass both plan= and warehouse=, or neither (the layer then plans its own)")
        if plan is None:
            own = plan_warehouses([spec], **ratios)
            plan = own.layers[0]
            warehouse = Warehouse(own.warehouses[0], [plan.slots])
        elif ratios:
            raise ValueError(f"ratios {sorted(ratios)} are set by the plan; do not pass them with plan=")
        if plan.spec.weight_shape != spec.weight_shape or plan.spec.in_channels != spec.in_channels:
            raise ValueError(
                f"plan of layer {plan.name!r} is for weight {plan.spec.weight_shape}, "
                f"this layer's weight is {spec.weight_shape}"
            )
        if warehouse.name != plan.warehouse or warehouse.num_cells != plan.warehouse_cells:
            raise ValueError(
                f"layer {plan.name!r} belongs to warehouse {plan.warehouse!r} with "
                f"{plan.warehouse_cells} cells, got {warehouse.name!r} with {warehouse.num_cells}"
            )
        self.plan = plan
        self.grid = plan.grid
        self.weight_shape = spec.weight_shape
        self.warehouse = warehouse
        self.attention = KWAttention(plan)
        self.bias = nn.Parameter(torch.zeros(spec.out_channels)) if bias else None
        #: A scale per output channel, applied before the bias (a BatchNorm folded in by
        #: :func:`kernelwarehouse.fuse_for_inference`), or None; exported graphs fold it into the
        #: assembled weights where that costs fewer multiplies.
        self.register_buffer("out_scale", None)

    #: The execution path (and backward form) this layer's last eager call ran, e.g. ``"loop:slices"``.
    last_path: str | None = None

    def _set_geometry(self, geo: ConvGeometry) -> None:
        self._geometry = geo
        # the same as lists, which TorchScript types, for the scripted convolution; a linear layer has
        # the stride, padding and dilation of the 1-d convolution of kernel 1 it equals (no empty list,
        # which TorchScript could not type)
        self._script_grid, self._script_weight_shape = list(geo.grid), list(geo.weight_shape)
        self._script_stride, self._script_padding = list(geo.stride or (1,)), list(geo.padding or (0,))
        self._script_dilation = list(geo.dilation or (1,))
        self._script_groups, self._script_dims = geo.groups, geo.dims

    def _scripted_convolve(self, x: torch.Tensor, mixture: torch.Tensor) -> torch.Tensor:
        """What the layer runs under ``torch.jit.script``: the reference scheme, all in TorchScript.
        The B weights assembled by one product over the warehouse, applied by one grouped
        convolution (``groups = groups * B``) or batched product, then the scale and the bias."""
        weight = assemble_by_product(
            mixture, self.warehouse.weight, self._script_grid, self._script_weight_shape
        )
        if self._script_dims == 0:
            out = linear_per_sample(x, weight.flatten(2), None)
        else:
            out = grouped_conv(
                x,
                weight,
                self._script_stride,
                self._script_padding,
                self._script_dilation,
                self._script_groups,
            )
        return output_epilogue(out, self.bias, self.out_scale, self._script_dims)

    def _convolve(self, x: torch.Tensor, mixture: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_convolve(x, mixture)
        if building_graph():  # no module state changes inside a traced or compiled graph
            return kw_conv(x, mixture, self.warehouse.weight, self.bias, self._geometry, scale=self.out_scale)
        out, self.last_path = kw_conv(
            x,
            mixture,
            self.warehouse.weight,
            self.bias,
            self._geometry,
            scale=self.out_scale,
            return_choice=True,
        )
        return out

    def mixture(self, pooled: torch.Tensor) -> torch.Tensor:
        """Mixture weights (B, m, n) for pooled inputs (B, C_in)."""
        return self.attention(pooled)

    def assemble(self, pooled: torch.Tensor) -> torch.Tensor:
        """Per-sample weights (B, *weight_shape) for pooled inputs (B, C_in)."""
        return assemble_weights(self.attention(pooled), self.warehouse.weight, self.grid, self.weight_shape)

    def _kw_repr(self) -> str:
        return (
            f"warehouse={self.plan.warehouse!r}, cells={self.plan.num_cells}, "
            f"warehouse_cells={self.plan.warehouse_cells}"
        )


class _KWConvNd(KWLayer):
    dims: int = 0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        plan: LayerPlan | None = None,
        warehouse: Warehouse | None = None,
        key: str = "conv",
        **ratios: Any,
    ) -> None:
        ntuple = _ntuple(self.dims)
        kernel = tuple(ntuple(kernel_size))
        spec = LayerSpec(plan.name if plan else "conv", key, in_channels, out_channels, kernel, groups)
        super().__init__(spec, bias, plan, warehouse, ratios)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = kernel, tuple(ntuple(stride)), tuple(ntuple(dilation))
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        self.padding = checked_padding(padding, self.stride)
        pads = self._explicit_padding()
        symmetric = all(left == right for left, right in zip(pads[::2], pads[1::2]))
        # a symmetric zero padding goes to the convolution; any other is applied to the input first
        self._pad = None if padding_mode == "zeros" and symmetric else list(pads)
        conv_padding = tuple(reversed(pads[::2])) if self._pad is None else (0,) * self.dims
        self._set_geometry(
            ConvGeometry(self.grid, self.weight_shape, self.stride, conv_padding, self.dilation, groups)
        )

    def _explicit_padding(self) -> tuple[int, ...]:
        """F.pad's (last dim first, left/right) amounts for a non-zero padding mode."""
        pads = []
        for d, k, p in zip(
            self.dilation,
            self.kernel_size,
            self.padding if isinstance(self.padding, tuple) else [None] * self.dims,
        ):
            if self.padding == "valid":
                left = right = 0
            elif self.padding == "same":
                total = d * (k - 1)
                left, right = total // 2, total - total // 2
            else:
                left = right = p
            pads.append((left, right))
        return tuple(v for pair in reversed(pads) for v in pair)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(x)
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            expected = ", ".join(["B", str(self.in_channels)] + ["..."] * self.dims)
            raise ValueError(
                f"{type(self).__name__}({self.in_channels}, {self.out_channels}, ...) expects a batched "
                f"{self.dims + 2}-d input ({expected}) with {self.in_channels} channels, got shape "
                f"{tuple(x.shape)}"
            )
        if building_graph():  # flattening would copy the activation in onnxruntime (a Reshape)
            pooled = x.mean(dim=tuple(range(2, x.dim())))
        else:
            pooled = x.flatten(2).mean(dim=-1)
        mixture = self.mixture(pooled)
        if self._pad is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pad, mode=mode)
        return self._convolve(x, mixture)

    def _scripted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` in TorchScript."""
        dims = self._script_dims
        if x.dim() != dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"KWConv{dims}d expects a batched {dims + 2}-d input with {self.in_channels} "
                f"channels, got shape {x.shape}"
            )
        mixture = self.attention(x.mean(dim=[d for d in range(2, x.dim())]))
        pad = self._pad
        if pad is not None:
            x = F.pad(x, pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        return self._scripted_convolve(x, mixture)

    def extra_repr(self) -> str:
        return f"{conv_repr(self)}, bias={self.bias is not None}, {self._kw_repr()}"


class KWConv1d(_KWConvNd):
    """KernelWarehouse drop-in for :class:`torch.nn.Conv1d`."""

    dims = 1


class KWConv2d(_KWConvNd):
    """KernelWarehouse drop-in for :class:`torch.nn.Conv2d`."""

    dims = 2


class KWConv3d(_KWConvNd):
    """KernelWarehouse drop-in for :class:`torch.nn.Conv3d`."""

    dims = 3


class KWLinear(KWLayer):
    """KernelWarehouse drop-in for :class:`torch.nn.Linear`.

    Treated as a 1-d convolution of kernel 1 over the token axis: an input (B, *tokens, C_in) gets
    one weight per sample, its attention pooling over all tokens.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        plan: LayerPlan | None = None,
        warehouse: Warehouse | None = None,
        key: str = "linear",
        **ratios: Any,
    ) -> None:
        spec = LayerSpec(plan.name if plan else "linear", key, in_features, out_features, (1,))
        super().__init__(spec, bias, plan, warehouse, ratios)
        self.in_features, self.out_features = in_features, out_features
        self._set_geometry(ConvGeometry(self.grid, self.weight_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"KWLinear expects {self.in_features} input features, got shape {tuple(x.shape)}"
            )
        unbatched = x.dim() == 1
        count = math.prod(x.shape[1:-1])  # tokens per sample, explicit so a free batch needs no guard
        tokens = (
            x.reshape(1, 1, self.in_features) if unbatched else x.reshape(x.shape[0], count, self.in_features)
        )
        mixture = self.mixture(tokens.mean(dim=1))
        out = self._convolve(tokens, mixture)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _scripted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` in TorchScript."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"KWLinear expects {self.in_features} input features, got shape {x.shape}")
        tokens = (
            x.reshape(1, 1, self.in_features) if x.dim() == 1 else x.reshape(x.shape[0], -1, self.in_features)
        )
        out = self._scripted_convolve(tokens, self.attention(tokens.mean(dim=1)))
        return out.reshape(x.shape[:-1] + [self.out_features])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._kw_repr()}"
        )
