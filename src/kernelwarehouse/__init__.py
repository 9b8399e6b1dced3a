"""kernelwarehouse: KernelWarehouse (Li & Yao, ICML 2024) for PyTorch."""
from .core import *  # noqa: F401,F403
from .core import __all__ as _core_all

__version__ = "0.1.0"

from . import detection  # noqa: E402
from .compat import load_reference_state_dict, model_from_reference_config  # noqa: E402
from .convert import Conversion, convert, load_static_weights, plan_conversion  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .train import Trainer, TrainConfig  # noqa: E402

__all__ = list(_core_all) + [
    "Conversion", "Trainer", "TrainConfig", "convert", "create_model", "detection", "list_models",
    "load_reference_state_dict", "load_static_weights", "model_from_reference_config", "plan_conversion",
]
