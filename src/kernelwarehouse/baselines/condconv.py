"""CondConv: conditionally parameterised convolution (Yang et al., NeurIPS 2019).

Each sample's kernel is ``W(x) = sum_k r_k(x) W_k`` over K expert kernels, with routing weights
``r(x) = sigmoid(GAP(x) R + c)`` (Sec. 3 of the paper): independent sigmoids, not a softmax, so
the experts are not forced to compete.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ._base import Conv2dArguments, MixtureConv2d


@dataclass(frozen=True)
class CondConvArguments(Conv2dArguments):
    """:class:`CondConv2d`'s arguments: ``nn.Conv2d``'s, then the number of experts K."""

    num_experts: int = 4


class CondConv2d(MixtureConv2d, arguments=CondConvArguments):
    """Drop-in ``nn.Conv2d`` with ``num_experts`` kernels and a sigmoid routing function.

    Takes the arguments of :class:`CondConvArguments`, positionally or by name.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        arguments = CondConvArguments(*args, **kwargs)
        super().__init__(arguments, arguments.num_experts)
        self.routing = nn.Linear(arguments.in_channels, arguments.num_experts)

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """r(x) of shape (B, K), each entry in (0, 1)."""
        return torch.sigmoid(self.routing(x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        routing = self.routing_weights(x)
        return self.add_bias(self.convolve(x, self.mix(routing)), routing)
