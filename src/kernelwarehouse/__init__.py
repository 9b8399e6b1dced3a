"""kernelwarehouse: KernelWarehouse (Li & Yao, ICML 2024) for PyTorch."""
from .core import *  # noqa: F401,F403
from .core import __all__ as _core_all

__version__ = "0.1.0"
__all__ = list(_core_all)

from .models import create_model, list_models  # noqa: E402

__all__ += ["create_model", "list_models"]

from .bench import MacCount, count_macs  # noqa: E402
from .core.execution import execution_path, get_execution_path, set_execution_path  # noqa: E402
from .export import export_onnx, trace  # noqa: E402

__all__ += ["MacCount", "count_macs", "execution_path", "export_onnx", "get_execution_path",
            "set_execution_path", "trace"]
