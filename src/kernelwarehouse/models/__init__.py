"""The paper's models: timm's ResNet, MobileNetV2, ConvNeXt and DeiT and their KernelWarehouse versions.

Each ``kw_*`` model is registered with timm (``timm.create_model("kw_resnet18", budget=1)``) and in
the project's registry with the paper's numbers (``create_model``, ``model_entry``).
"""

from . import convnext, deit, mobilenetv2, resnet  # noqa: F401  (register the models)
from .factory import Family
from .registry import create_model, format_budget, list_models, model_entry, parse_budget

__all__ = ["Family", "create_model", "format_budget", "list_models", "model_entry", "parse_budget"]

from ..baselines import models as _baselines  # noqa: E402,F401  (registers CondConv, DY-Conv, ODConv models)
