"""What the dynamic-convolution baselines share: K full-size kernels of one conv layer, mixed per
sample by an attention over K and applied through the project's execution path."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from ..core.execution import conv_per_sample
from ..core.layers import checked_padding, conv_repr


def attention_width(in_channels: int, reduction: float, min_hidden: int) -> int:
    """Hidden width of an attention branch: ``max(int(in_channels * reduction), min_hidden)``."""
    if not 0 < reduction <= 1:
        raise ValueError(f"reduction must lie in (0, 1], got {reduction}")
    return max(int(in_channels * reduction), min_hidden)


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    return float(temperature)


@dataclass(frozen=True)
class Conv2dArguments:
    """The arguments of :class:`torch.nn.Conv2d` in its order and with its defaults (zero padding
    only): what every baseline layer takes first, positionally or by name. Each layer's own
    arguments (its number of kernels K, then its attention's options) extend it in a subclass, so
    that they follow in the same order."""

    in_channels: int
    out_channels: int
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] = 1
    padding: int | Sequence[int] | str = 0
    dilation: int | Sequence[int] = 1
    groups: int = 1
    bias: bool = True


class MixtureConv2d(nn.Module):
    """A 2-d convolution whose weight is one of ``num_kernels`` kernels or a per-sample mixture of them.

    ``weight`` has shape (K, C_out, C_in / groups, k_h, k_w); subclasses add the attention branch.
    A subclass names the dataclass of its arguments, ``class CondConv2d(MixtureConv2d,
    arguments=CondConvArguments)``, binds ``*args, **kwargs`` to it in ``__init__``, and shows its
    signature (:func:`inspect.signature`, ``help``).
    """

    def __init_subclass__(cls, arguments: type | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if arguments is not None:
            self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
            fields = inspect.signature(arguments).parameters.values()
            cls.__init__.__signature__ = inspect.Signature([self, *fields])

    def __init__(self, conv: Conv2dArguments, num_kernels: int) -> None:
        super().__init__()
        in_channels, out_channels, groups = conv.in_channels, conv.out_channels, conv.groups
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                f"divisible by groups ({groups})"
            )
        if isinstance(num_kernels, bool) or not isinstance(num_kernels, int) or num_kernels < 1:
            raise ValueError(f"the number of kernels must be an int >= 1, got {num_kernels!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(conv.kernel_size), _pair(conv.stride)
        self.dilation, self.padding = _pair(conv.dilation), checked_padding(conv.padding, self.stride)
        self.num_kernels = num_kernels
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(num_kernels, *self.weight_shape))
        for kernel in self.weight.data:
            nn.init.kaiming_normal_(kernel, mode="fan_out", nonlinearity="relu")
        # one bias per kernel, mixed like the kernels (DY-Conv, Chen et al. 2020, Eq. 1)
        self.bias = nn.Parameter(torch.zeros(num_kernels, out_channels)) if conv.bias else None

    def mix(self, attention: torch.Tensor) -> torch.Tensor:
        """Per-sample weights (B, C_out, C_in / groups, k_h, k_w) from kernel weights (B, K)."""
        return (attention @ self.weight.flatten(1)).reshape(attention.shape[0], *self.weight_shape)

    def convolve(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Convolve sample b of ``x`` with ``weight[b]``, without bias."""
        return conv_per_sample(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def add_bias(self, out: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        """``out`` plus the bias mixed by kernel weights (B, K), or the only bias when K = 1."""
        if self.bias is None:
            return out
        bias = self.bias[0].expand(out.shape[0], -1) if attention is None else attention @ self.bias
        return out + bias[:, :, None, None]

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input (B, {self.in_channels}, H, W), "
                f"got shape {tuple(x.shape)}"
            )

    def assembly_macs(self, x: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
        """Per-sample (weight assembly, feature-map scaling) multiply-adds, for ``count_macs``:
        mixing K kernels costs K |W|; a single kernel is used as it is."""
        return (self.num_kernels * math.prod(self.weight_shape) if self.num_kernels > 1 else 0), 0

    def extra_repr(self) -> str:
        return f"{conv_repr(self)}, kernels={self.num_kernels}"
