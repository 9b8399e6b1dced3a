"""The model registry: ``create_model(name, budget=..., **overrides)`` and ``list_models()``."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    """A registered model; ``paper`` maps a budget (None for static) to (params M, top-1) of the
    paper's tables, ``reference_params`` to the exact count of the reference implementation.
    For a baseline (``kind="baseline"``) the keys of ``paper`` are numbers of kernels K."""

    name: str
    builder: Callable[..., nn.Module]
    dynamic: bool
    paper: dict[Fraction | None, tuple[float, float | None]] = field(default_factory=dict)
    reference_params: dict[Fraction | None, int] = field(default_factory=dict)
    kind: str = (
        ""  # "static", "kw" or "baseline" (a dynamic convolution without budget); default by ``dynamic``
    )

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", "kw" if self.dynamic else "static")
        if self.kind not in ("static", "kw", "baseline") or (self.kind == "kw") != self.dynamic:
            raise ValueError(
                f"model {self.name!r}: kind {self.kind!r} does not agree with dynamic={self.dynamic}"
            )

    def check_budget(self, budget: Any) -> None:
        """Raise for a budget given to a model that takes none (static models and baselines)."""
        if budget is not None and not self.dynamic:
            raise no_budget_error(self.name, self.kind)

    @property
    def budgets(self) -> list[Fraction | None]:
        return list(self.reference_params or self.paper or [None])


def no_budget_error(name: str, kind: str = "static") -> ValueError:
    """The error for a budget given to model ``name`` of ``kind`` ``"static"`` or ``"baseline"``."""
    if kind == "baseline":
        return ValueError(
            f"{name} is a dynamic-convolution baseline and takes no budget; "
            f"set its number of kernels instead (e.g. kernel_num=4)"
        )
    return ValueError(f"{name} is a static model and takes no budget; use kw_{name}")


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def register_zoo(paper: dict | None = None, reference_params: dict | None = None, kind: str = ""):
    """Decorator: register a model builder under its function name (``kw_*`` names are KernelWarehouse
    models); ``paper`` and ``reference_params`` as in :class:`ModelEntry`."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        register(
            ModelEntry(
                name, builder, name.startswith("kw_"), dict(paper or {}), dict(reference_params or {}), kind
            )
        )
        return builder

    return decorate


def list_models() -> list[str]:
    """Names of every registered model."""
    return list(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def parse_budget(budget: Any) -> Fraction:
    """A budget b > 0 from a number or a string such as ``"1/2"``, ``"0.25"`` or ``"4x"``."""
    try:
        if isinstance(budget, bool):
            raise TypeError
        if isinstance(budget, str):
            text = budget.strip().lower().removesuffix("x").replace("d", "/")
            value = Fraction(text)
        else:
            value = Fraction(budget).limit_denominator(1 << 16)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ValueError(f"budget must be a number > 0 (e.g. 0.5, '1/2', '4x'), got {budget!r}") from None
    if value <= 0:
        raise ValueError(f"budget must be > 0, got {budget!r}")
    return value


def format_budget(budget: Fraction | None) -> str:
    if budget is None:
        return "static"
    return f"{budget.numerator}/{budget.denominator}x" if budget.denominator != 1 else f"{budget.numerator}x"


def create_model(name: str, budget: Any = None, num_classes: int = 1000, **overrides: Any) -> nn.Module:
    """Build a registered model. KernelWarehouse models take ``budget`` (default 1) and any
    warehouse option (``cell_num_ratio``, ``cell_inplane_ratio``, ``reduction``, ``norm``, ...) as
    overrides; static models take no budget."""
    entry = model_entry(name)
    entry.check_budget(budget)
    if not entry.dynamic:
        return entry.builder(num_classes=num_classes, **overrides)
    return entry.builder(
        budget=parse_budget(1 if budget is None else budget), num_classes=num_classes, **overrides
    )
