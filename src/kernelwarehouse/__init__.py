"""kernelwarehouse: KernelWarehouse (Li & Yao, ICML 2024) for PyTorch."""

from .core import *  # noqa: F401,F403
from .core import __all__ as _core_all

__version__ = "0.1.0"

from . import detection, native  # noqa: E402,F401  (kw.detection, kw.native)
from .baselines import CondConv2d, DynamicConv2d, ODConv2d, set_baseline_temperature  # noqa: E402
from .bench import MacCount, count_macs  # noqa: E402
from .compat import load_reference_state_dict, model_from_reference_config  # noqa: E402
from .convert import Conversion, convert, load_static_state_dict, load_static_weights, plan_conversion  # noqa: E402
from .core.execution import execution_path, get_execution_path, set_execution_path  # noqa: E402
from .export import export_onnx, trace  # noqa: E402
from .fusion import fuse_for_inference  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .train import Trainer, TrainConfig  # noqa: E402

__all__ = list(_core_all) + [
    "CondConv2d",
    "DynamicConv2d",
    "ODConv2d",
    "set_baseline_temperature",
    "Conversion",
    "MacCount",
    "Trainer",
    "TrainConfig",
    "convert",
    "count_macs",
    "create_model",
    "detection",
    "execution_path",
    "export_onnx",
    "fuse_for_inference",
    "get_execution_path",
    "list_models",
    "load_reference_state_dict",
    "load_static_state_dict",
    "load_static_weights",
    "model_from_reference_config",
    "plan_conversion",
    "set_execution_path",
    "trace",
]
