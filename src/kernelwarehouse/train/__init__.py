"""Training, evaluation and analysis of KernelWarehouse models (the engine behind ``kw train``)."""

from .checkpoint import load_checkpoint, save_checkpoint
from .data import DataInfo, EpochBatches, load_data
from .ema import ModelEma
from .evaluate import count_parameters, evaluate
from .recipes import RECIPES, Recipe, get_recipe
from .config import TrainConfig
from .trainer import Trainer, build_model

__all__ = [
    "DataInfo",
    "EpochBatches",
    "ModelEma",
    "RECIPES",
    "Recipe",
    "TrainConfig",
    "Trainer",
    "build_model",
    "count_parameters",
    "evaluate",
    "get_recipe",
    "load_checkpoint",
    "load_data",
    "save_checkpoint",
]
