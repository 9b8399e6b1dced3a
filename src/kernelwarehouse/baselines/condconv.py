"""CondConv: conditionally parameterised convolution (Yang et al., NeurIPS 2019).

Each sample's kernel is ``W(x) = sum_k r_k(x) W_k`` over K expert kernels, with routing weights
``r(x) = sigmoid(GAP(x) R + c)`` (Sec. 3 of the paper): independent sigmoids, not a softmax, so
the experts are not forced to compete.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ._base import MixtureConv2d


class CondConv2d(MixtureConv2d):
    """Drop-in ``nn.Conv2d`` with ``num_experts`` kernels and a sigmoid routing function."""

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
        num_experts: int = 4,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts
        )
        self.routing = nn.Linear(in_channels, num_experts)

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """r(x) of shape (B, K), each entry in (0, 1)."""
        return torch.sigmoid(self.routing(x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        routing = self.routing_weights(x)
        return self.add_bias(self.convolve(x, self.mix(routing)), routing)
