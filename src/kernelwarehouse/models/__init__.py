"""The paper's models: static ResNet, MobileNetV2 and ConvNeXt and their KernelWarehouse versions."""
from . import zoo  # noqa: F401  (registers the models)
from . import deit  # noqa: F401  (registers DeiT)
from .convnext import ConvNeXt
from .mobilenetv2 import MobileNetV2
from .registry import create_model, format_budget, list_models, model_entry, parse_budget
from .resnet import ResNet
from . import timm_bridge  # noqa: E402,F401  (registers the zoo with timm, when installed)

__all__ = ["ConvNeXt", "MobileNetV2", "ResNet", "create_model", "format_budget", "list_models",
           "model_entry", "parse_budget"]

from ..baselines import models as _baselines  # noqa: E402,F401  (registers CondConv, DY-Conv, ODConv models)
