"""The warehouse: n kernel cells that every layer of one sharing group mixes its cells from."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from .plan import WarehousePlan


class Warehouse(nn.Module):
    """Holds ``weight`` of shape (n, c_out, c_in, *cell_kernel).

    One instance is a submodule of every layer that draws from it, so moving, copying or
    pickling any part of a model keeps the sharing; ``model.parameters()`` lists it once.
    """

    __jit_unused_properties__ = ["num_cells", "cell_shape"]  # eager-only: TorchScript skips them

    def __init__(self, plan: WarehousePlan, owned: Iterable[tuple[int, int]] = ()) -> None:
        super().__init__()
        self.plan = plan
        self.name = plan.name
        # Stored output channel first: the n cells' rows for one output channel lie together, the
        # order in which one sample's weight is assembled (see ``loop._sample_weight``).
        c_out, *rest = plan.cell_shape
        self.weight = nn.Parameter(torch.empty(c_out, plan.num_cells, *rest).transpose(0, 1))
        self.owned = tuple(owned) or ((0, plan.num_cells),)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, relu) init of each layer's owned slots, as one stacked kernel."""
        with torch.no_grad():
            for start, stop in self.owned:
                if stop == start:
                    continue
                cells = self.weight[start:stop]
                stacked = torch.empty(
                    cells.shape[0] * cells.shape[1], *cells.shape[2:], dtype=cells.dtype, device=cells.device
                )
                nn.init.kaiming_normal_(stacked, mode="fan_out", nonlinearity="relu")
                cells.copy_(stacked.view(cells.shape))

    @property
    def num_cells(self) -> int:
        return self.weight.shape[0]

    @property
    def cell_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[1:])

    def extra_repr(self) -> str:
        return f"{self.name!r}, cells={self.num_cells}, cell_shape={'x'.join(map(str, self.cell_shape))}"
