"""kernelwarehouse: KernelWarehouse (Li & Yao, ICML 2024) for PyTorch."""
from .core import *  # noqa: F401,F403
from .core import __all__ as _core_all

__version__ = "0.1.0"
__all__ = list(_core_all)

from .models import create_model, list_models  # noqa: E402

__all__ += ["create_model", "list_models"]

from .baselines import CondConv2d, DynamicConv2d, ODConv2d, set_baseline_temperature  # noqa: E402

__all__ += ["CondConv2d", "DynamicConv2d", "ODConv2d", "set_baseline_temperature"]
