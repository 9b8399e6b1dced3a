"""The KernelWarehouse core: planning, attention, warehouses, execution and layers."""

from .attention import KWAttention
from .build import apply_plan, build_kernelwarehouse, chosen_paths, kw_layers, layer_spec, plan_model, plan_of
from .choice import (
    clear_path_choices,
    get_path_choice,
    load_path_choices,
    path_choice,
    path_choices,
    set_path_choice,
)
from .layers import KWConv1d, KWConv2d, KWConv3d, KWLayer, KWLinear
from .plan import LayerPlan, LayerSpec, Plan, WarehouseConfig, WarehousePlan, fuse_name, plan_warehouses
from .temperature import (
    TemperatureAnnealing,
    TemperatureSchedule,
    anneal,
    get_temperature,
    linear_temperature,
    set_temperature,
)
from .warehouse import Warehouse

__all__ = [
    "KWAttention",
    "KWConv1d",
    "KWConv2d",
    "KWConv3d",
    "KWLayer",
    "KWLinear",
    "LayerPlan",
    "LayerSpec",
    "Plan",
    "TemperatureAnnealing",
    "TemperatureSchedule",
    "anneal",
    "Warehouse",
    "WarehouseConfig",
    "WarehousePlan",
    "apply_plan",
    "build_kernelwarehouse",
    "chosen_paths",
    "clear_path_choices",
    "fuse_name",
    "get_path_choice",
    "load_path_choices",
    "path_choice",
    "path_choices",
    "set_path_choice",
    "get_temperature",
    "kw_layers",
    "layer_spec",
    "linear_temperature",
    "plan_model",
    "plan_of",
    "plan_warehouses",
    "set_temperature",
]
