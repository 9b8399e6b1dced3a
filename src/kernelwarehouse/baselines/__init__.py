"""The dynamic convolutions KernelWarehouse is compared with: CondConv, DY-Conv and ODConv."""

from .condconv import CondConv2d
from .dyconv import DynamicConv2d
from .odconv import ODAttention, ODConv2d
from .temperature import baseline_temperature, set_baseline_temperature

__all__ = [
    "CondConv2d",
    "DynamicConv2d",
    "ODAttention",
    "ODConv2d",
    "baseline_temperature",
    "set_baseline_temperature",
]
from .models import build_baseline, dynamic_like  # noqa: E402  (registers the models)

__all__ += ["build_baseline", "dynamic_like"]
