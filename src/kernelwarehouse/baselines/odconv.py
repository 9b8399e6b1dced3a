"""ODConv: omni-dimensional dynamic convolution (Li, Zhou and Yao, ICLR 2022).

Four attentions, computed in parallel from one squeeze of the input, scale the kernel space along
all its dimensions (Eq. 2 of the paper):
``y = (a_w1 * a_f1 * a_c1 * a_s1 * W_1 + ... + a_wK * a_fK * a_cK * a_sK * W_K) * x``, where a_s is a
spatial (k_h x k_w), a_c an input-channel, a_f an output-channel (filter) and a_w a kernel attention.
As in the authors' models the channel and filter attentions, which are shared by the K kernels,
scale the input and output feature maps (the same product, cheaper); a_s scales the mixed kernel.
The squeeze is GAP -> FC -> BN -> ReLU with width ``max(int(C_in * reduction), 16)``; the kernel
attention is a softmax over K, the others sigmoids, all divided by a temperature (annealed from 30
to 1 in the paper's recipe, see :func:`kernelwarehouse.baselines.set_baseline_temperature`).
An attention that would be trivial is left out: the kernel attention when K = 1, the spatial one for
1x1 kernels and the filter one for depthwise convolutions (there the channel attention already
scales each filter). A 1x1 convolution with K = 1 keeps a static kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Conv2dArguments, MixtureConv2d, attention_width, check_temperature


class ODAttention(nn.Module):
    """The four attentions of an ODConv layer from its input; absent ones are returned as None."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        groups: int,
        num_kernels: int,
        reduction: float = 1 / 16,
        min_hidden: int = 16,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        hidden = attention_width(in_channels, reduction, min_hidden)
        self.kernel_size = kernel_size
        self.fc = nn.Linear(in_channels, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.channel_fc = nn.Linear(hidden, in_channels)
        depthwise = in_channels == groups == out_channels
        self.filter_fc = None if depthwise else nn.Linear(hidden, out_channels)
        spatial = kernel_size[0] * kernel_size[1]
        self.spatial_fc = nn.Linear(hidden, spatial) if spatial > 1 else None
        self.kernel_fc = nn.Linear(hidden, num_kernels) if num_kernels > 1 else None
        self.temperature = check_temperature(temperature)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(channel (B, C_in), filter (B, C_out) | None, spatial (B, k_h, k_w) | None,
        kernel (B, K) | None)."""
        if self.training and x.shape[0] == 1:
            raise ValueError(
                "ODConv attention uses BatchNorm and cannot train on a batch of 1: "
                "call model.eval() or use a larger batch"
            )
        h = F.relu(self.bn(self.fc(x.mean(dim=(2, 3)))))
        t = self.temperature
        channel = torch.sigmoid(self.channel_fc(h) / t)
        filters = None if self.filter_fc is None else torch.sigmoid(self.filter_fc(h) / t)
        spatial = None
        if self.spatial_fc is not None:
            spatial = torch.sigmoid(self.spatial_fc(h) / t).reshape(-1, *self.kernel_size)
        kernel = None if self.kernel_fc is None else torch.softmax(self.kernel_fc(h) / t, dim=1)
        return channel, filters, spatial, kernel

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}"


@dataclass(frozen=True)
class ODConvArguments(Conv2dArguments):
    """:class:`ODConv2d`'s arguments: ``nn.Conv2d``'s, then the number of kernels K and the options of
    its :class:`ODAttention`."""

    kernel_num: int = 4
    reduction: float = 1 / 16
    min_hidden: int = 16
    temperature: float = 1.0


class ODConv2d(MixtureConv2d, arguments=ODConvArguments):
    """Drop-in ``nn.Conv2d`` with ``kernel_num`` kernels and omni-dimensional attention.

    Takes the arguments of :class:`ODConvArguments`, positionally or by name. ``bias`` (off in the
    paper's models) is one bias per kernel, mixed by the kernel attention and added after the filter
    attention.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        arguments = ODConvArguments(*args, **kwargs)
        super().__init__(arguments, arguments.kernel_num)
        self.attention = ODAttention(
            arguments.in_channels,
            arguments.out_channels,
            self.kernel_size,
            arguments.groups,
            arguments.kernel_num,
            arguments.reduction,
            arguments.min_hidden,
            arguments.temperature,
        )

    @property
    def temperature(self) -> float:
        return self.attention.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.attention.temperature = check_temperature(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        channel, filters, spatial, kernel = self.attention(x)
        x = x * channel[:, :, None, None]
        if kernel is None and spatial is None:  # a static kernel
            out = F.conv2d(x, self.weight[0], None, self.stride, self.padding, self.dilation, self.groups)
        else:
            weight = (
                self.weight[0].expand(x.shape[0], *self.weight_shape) if kernel is None else self.mix(kernel)
            )
            if spatial is not None:
                weight = weight * spatial[:, None, None]
            out = self.convolve(x, weight)
        if filters is not None:
            out = out * filters[:, :, None, None]
        return self.add_bias(out, kernel)

    def assembly_macs(self, x: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
        """Kernel mixing plus the spatial attention's |W| scaling; the input- and output-channel
        attentions scale feature maps."""
        mixing, _ = super().assembly_macs(x, out)
        att = self.attention
        mixing += math.prod(self.weight_shape) if att.spatial_fc is not None else 0
        return mixing, x[0].numel() + (out[0].numel() if att.filter_fc is not None else 0)
