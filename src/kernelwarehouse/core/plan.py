"""Warehouse planning: which layers share a warehouse, the cell shape, n, and each layer's cells.

A plan is a plain value computed from a list of :class:`LayerSpec` and the ratios of KernelWarehouse
(Li & Yao, ICML 2024, Sec. 3): nothing here touches a tensor. Building a model is
``plan_warehouses(...)`` followed by creating the parameters the plan describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, NamedTuple, Sequence

NORMS = ("batch", "layer", "group", "none")
ZERO_CELL = -1  # beta target of a cell that starts as the zero cell


@dataclass(frozen=True)
class LayerSpec:
    """What the planner needs to know of one layer.

    ``key`` is the hierarchical name that sharing ranges act on (``stage2_layer1_conv0``); ``name``
    is the module path. A linear layer is a 1-d convolution with kernel size 1.
    """

    name: str
    key: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    groups: int = 1

    def __post_init__(self) -> None:
        if self.in_channels <= 0 or self.out_channels <= 0 or min(self.kernel_size, default=0) <= 0:
            raise ValueError(
                f"layer {self.name!r}: channels and kernel sizes must be positive, got "
                f"in={self.in_channels}, out={self.out_channels}, kernel={self.kernel_size}"
            )
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"layer {self.name!r}: groups={self.groups} must divide in_channels="
                f"{self.in_channels} and out_channels={self.out_channels}"
            )

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)


@dataclass(frozen=True)
class WarehouseConfig:
    """The knobs of one warehouse; ``cell_num_ratio`` is the budget b = n / m_total."""

    cell_num_ratio: float = 1.0
    cell_inplane_ratio: float = 1.0
    cell_outplane_ratio: float = 1.0
    reduction: float = 1 / 16
    spatial_partition: bool = True
    nonlocal_basis_ratio: float = 1.0
    norm: str = "batch"
    min_hidden: int = 16

    def __post_init__(self) -> None:
        for name in (
            "cell_num_ratio",
            "cell_inplane_ratio",
            "cell_outplane_ratio",
            "reduction",
            "nonlocal_basis_ratio",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.min_hidden < 1:
            raise ValueError(f"min_hidden must be >= 1, got {self.min_hidden}")


RATIO_NAMES = tuple(f.name for f in fields(WarehouseConfig))


@dataclass(frozen=True)
class WarehousePlan:
    """One warehouse: n cells of ``cell_shape`` = (c_out, c_in, *cell_kernel)."""

    name: str
    index: int
    cell_shape: tuple[int, ...]
    num_cells: int
    config: WarehouseConfig
    layers: tuple[str, ...]

    @property
    def num_parameters(self) -> int:
        return self.num_cells * math.prod(self.cell_shape)


class CellGrid(NamedTuple):
    """How a layer's weight is cut into its m = spatial * out_blocks * in_blocks cells: kernel
    positions split apart (1 when a cell holds the whole kernel), blocks of output channels and blocks
    of input channels. Cells are numbered in that order (:mod:`kernelwarehouse.core.assembly`)."""

    spatial: int
    out_blocks: int
    in_blocks: int

    def __str__(self) -> str:  # the plain tuple's text: measured path choices are keyed by it
        return tuple.__repr__(self)


@dataclass(frozen=True)
class LayerPlan:
    """One layer's share of its warehouse.

    ``grid`` is the :class:`CellGrid` (spatial blocks, output blocks, input blocks); the layer has
    m = prod(grid) cells, numbered in that order. ``slots`` = [start, stop) are the warehouse cells
    this layer owns (initialised for it, and its local cells in the nonlocal basis); ``beta`` gives,
    per cell, the slot its temperature initialisation points at, or ``ZERO_CELL``.
    """

    spec: LayerSpec
    warehouse: str
    warehouse_cells: int
    grid: CellGrid
    slots: tuple[int, int]
    beta: tuple[int, ...]
    hidden: int
    num_basis: int
    config: WarehouseConfig

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", CellGrid(*self.grid))  # a plain (read or built) tuple gets its names

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_cells(self) -> int:
        return math.prod(self.grid)

    @property
    def num_local(self) -> int:
        return self.slots[1] - self.slots[0]

    @property
    def num_nonlocal(self) -> int:
        return self.warehouse_cells - self.num_local

    @property
    def attention_outputs(self) -> int:
        """Width of the attention's second linear: per cell, n + 1 logits or (local, basis, zero)."""
        per_cell = self.warehouse_cells + 1 if not self.num_basis else self.num_local + self.num_basis + 1
        return self.num_cells * per_cell

    @property
    def attention_parameters(self) -> int:
        cfg, c_in, h = self.config, self.spec.in_channels, self.hidden
        fc1 = c_in * h + (0 if cfg.norm == "batch" else h)
        norm = 0 if cfg.norm == "none" else 2 * h
        return fc1 + norm + self.mixing_parameters

    @property
    def mixing_parameters(self) -> int:
        """The attention parameters that grow with the warehouse: the second linear (and basis)."""
        fc2 = self.hidden * self.attention_outputs
        if self.num_basis:
            return fc2 + self.num_basis * self.num_nonlocal + self.num_cells * (self.warehouse_cells + 1)
        return fc2 + self.attention_outputs


@dataclass(frozen=True)
class Plan:
    """A complete warehouse plan: the warehouses and, in visiting order, their layers."""

    warehouses: tuple[WarehousePlan, ...]
    layers: tuple[LayerPlan, ...]
    sharing_range: tuple[str, ...] = field(default=())

    def warehouse(self, name: str) -> WarehousePlan:
        for w in self.warehouses:
            if w.name == name:
                return w
        raise KeyError(f"no warehouse named {name!r}; have {[w.name for w in self.warehouses]}")

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in this plan")

    @property
    def num_parameters(self) -> int:
        """Warehouse cells plus attention branches (layer biases excluded)."""
        return sum(w.num_parameters for w in self.warehouses) + sum(
            layer.attention_parameters for layer in self.layers
        )

    def __str__(self) -> str:
        rows = [("warehouse", "cell", "n", "b", "layers", "m total", "params")]
        for w in self.warehouses:
            members = [layer for layer in self.layers if layer.warehouse == w.name]
            rows.append(
                (
                    w.name,
                    "x".join(map(str, w.cell_shape)),
                    str(w.num_cells),
                    f"{w.config.cell_num_ratio:g}",
                    str(len(members)),
                    str(sum(layer.num_cells for layer in members)),
                    f"{w.num_parameters:,}",
                )
            )
        lines = [
            _table(rows),
            "",
            _table(
                [("layer", "warehouse", "weight", "grid", "m", "slots", "hidden", "basis")]
                + [
                    (
                        layer.name,
                        layer.warehouse,
                        "x".join(map(str, layer.spec.weight_shape)),
                        "x".join(map(str, layer.grid)),
                        str(layer.num_cells),
                        f"{layer.slots[0]}:{layer.slots[1]}",
                        str(layer.hidden),
                        str(layer.num_basis or "-"),
                    )
                    for layer in self.layers
                ]
            ),
        ]
        lines.append(
            f"\n{len(self.layers)} layers, {len(self.warehouses)} warehouses, "
            f"{self.num_parameters:,} warehouse + attention parameters"
        )
        return "\n".join(lines)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def fuse_name(key: str, sharing_range: Sequence[str]) -> str:
    """Collapse every ``_``-separated part of ``key`` that starts with a sharing prefix to it.

    With sharing range (``layer``, ``conv``), ``stage2_layer1_conv0`` becomes ``stage2_layer_conv``.
    """
    parts = []
    for part in key.split("_"):
        for prefix in sharing_range:
            if part.startswith(prefix):
                part = prefix
        parts.append(part)
    return "_".join(parts)


def _per_warehouse(name: str, value: Any, warehouses: Sequence[str]) -> list[Any]:
    """A ratio given once, per warehouse in order (sequence), or by warehouse name (mapping)."""
    if isinstance(value, Mapping):
        unknown = set(value) - set(warehouses) - {"default"}
        if unknown:
            raise ValueError(
                f"{name}: no warehouse named {sorted(unknown)}; warehouses are {list(warehouses)}"
            )
        default = value.get("default", getattr(WarehouseConfig, name))
        return [value.get(w, default) for w in warehouses]
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return list(value) * len(warehouses)
        if len(value) != len(warehouses):
            raise ValueError(
                f"{name}: got {len(value)} values for {len(warehouses)} warehouses {list(warehouses)}"
            )
        return list(value)
    return [value] * len(warehouses)


def plan_warehouses(layers: Sequence[LayerSpec], sharing_range: Sequence[str] = (), **ratios: Any) -> Plan:
    """Plan the warehouses of ``layers`` (given in visiting order, i.e. module order).

    Every keyword of :class:`WarehouseConfig` may be a single value, a sequence with one value per
    warehouse (in order of first appearance), or a mapping from warehouse name to value.
    """
    if not layers:
        raise ValueError("nothing to plan: no layers were given")
    unknown = set(ratios) - set(RATIO_NAMES)
    if unknown:
        raise TypeError(f"unknown warehouse option(s) {sorted(unknown)}; known: {list(RATIO_NAMES)}")
    if isinstance(sharing_range, str):
        sharing_range = tuple(p for p in sharing_range.split("_") if p)
    sharing_range = tuple(sharing_range)
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"layer names must be unique, got duplicates in {names}")

    groups: dict[str, list[LayerSpec]] = {}
    for layer in layers:
        groups.setdefault(fuse_name(layer.key, sharing_range), []).append(layer)
    wnames = list(groups)
    resolved = {k: _per_warehouse(k, v, wnames) for k, v in ratios.items()}
    configs = [WarehouseConfig(**{k: v[i] for k, v in resolved.items()}) for i in range(len(wnames))]

    warehouse_plans, layer_plans = [], {}
    for index, (wname, members) in enumerate(groups.items()):
        wplan, plans = _plan_one(wname, index, members, configs[index])
        warehouse_plans.append(wplan)
        layer_plans.update({p.name: p for p in plans})
    return Plan(tuple(warehouse_plans), tuple(layer_plans[n] for n in names), sharing_range)


def _plan_one(
    wname: str, index: int, members: list[LayerSpec], cfg: WarehouseConfig
) -> tuple[WarehousePlan, list[LayerPlan]]:
    dims = {len(layer.kernel_size) for layer in members}
    if len(dims) > 1:
        raise ValueError(
            f"warehouse {wname!r} mixes layers of different dimensionality: "
            + ", ".join(f"{m.name} ({len(m.kernel_size)}-d)" for m in members)
        )
    g_out = math.gcd(*(m.out_channels for m in members))
    g_in = math.gcd(*(m.in_channels // m.groups for m in members))
    c_out = max(int(g_out * cfg.cell_outplane_ratio), 1)
    c_in = max(int(g_in * cfg.cell_inplane_ratio), 1)
    if cfg.spatial_partition:
        cell_k = (1,) * dims.pop()
    else:
        kernels = {m.kernel_size for m in members}
        if len(kernels) > 1:
            raise ValueError(
                f"warehouse {wname!r}: spatial_partition=False needs one kernel size, got "
                + ", ".join(f"{m.name} {m.kernel_size}" for m in members)
            )
        cell_k = kernels.pop()

    grids = []
    for m in members:
        c_in_g = m.in_channels // m.groups
        if m.out_channels % c_out or c_in_g % c_in:
            raise ValueError(
                f"layer {m.name!r} (weight {'x'.join(map(str, m.weight_shape))}) cannot be cut into cells of "
                f"{c_out}x{c_in} of warehouse {wname!r}: cell_outplane_ratio={cfg.cell_outplane_ratio} of "
                f"gcd {g_out} and cell_inplane_ratio={cfg.cell_inplane_ratio} of gcd {g_in} must divide the "
                f"layer's {m.out_channels} output and {c_in_g} input channels"
            )
        grids.append(
            CellGrid(
                math.prod(k // c for k, c in zip(m.kernel_size, cell_k)),
                m.out_channels // c_out,
                c_in_g // c_in,
            )
        )
    cells = [math.prod(g) for g in grids]
    n = max(int(sum(cells) * cfg.cell_num_ratio), 1)
    assignments = assign_slots(cells, n, cfg.cell_num_ratio)

    plans = []
    for m, grid, (slots, beta) in zip(members, grids, assignments):
        hidden = max(int(m.in_channels * cfg.reduction), cfg.min_hidden)
        num_basis, num_nonlocal = 0, n - (slots[1] - slots[0])
        if cfg.nonlocal_basis_ratio < 1 and num_nonlocal > 0:
            num_basis = max(int(num_nonlocal * cfg.nonlocal_basis_ratio), 16)
        plans.append(LayerPlan(m, wname, n, grid, slots, beta, hidden, num_basis, cfg))
    wplan = WarehousePlan(wname, index, (c_out, c_in, *cell_k), n, cfg, tuple(m.name for m in members))
    return wplan, plans


def assign_slots(
    cells: Sequence[int], n: int, budget: float
) -> list[tuple[tuple[int, int], tuple[int, ...]]]:
    """Give each layer its owned warehouse slots and the beta target of each of its cells.

    The reference rule: with b >= 1 and k = int(b), cell t points at slot start + t*k and the layer
    owns m*k slots; with b < 1 and p = int(1/b), cell t takes the next free slot when
    t % p == (t // p) % p and the zero cell otherwise. Where that rule does not own every one of
    the n slots exactly once (a budget such as 1.5 or 0.3), slots are shared out in proportion:
    layer l owns [floor(b * M_<l), floor(b * M_<=l)) and spreads its cells evenly over them.
    """
    result = _reference_assignment(cells, budget)
    if result[-1][0][1] == n:
        return result
    result, start, total = [], 0, 0
    for index, m in enumerate(cells):
        total += m
        stop = n if index == len(cells) - 1 else min(int(budget * total), n)
        owned = stop - start
        if owned >= m:
            beta = tuple(start + t * owned // m for t in range(m))
        else:
            beta = tuple(
                start + t * owned // m if (t + 1) * owned // m > t * owned // m else ZERO_CELL
                for t in range(m)
            )
        result.append(((start, stop), beta))
        start = stop
    return result


def _reference_assignment(
    cells: Sequence[int], budget: float
) -> list[tuple[tuple[int, int], tuple[int, ...]]]:
    result, start = [], 0
    for m in cells:
        beta = []
        if budget >= 1:
            k = int(budget)
            beta = [start + t * k for t in range(m)]
            stop = start + m * k
        else:
            p, stop = int(1 / budget), start
            for t in range(m):
                if t % p == (t // p) % p:
                    beta.append(stop)
                    stop += 1
                else:
                    beta.append(ZERO_CELL)
        result.append(((start, stop), tuple(beta)))
        start = stop
    return result
