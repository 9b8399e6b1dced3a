"""How a zoo model is made: timm's architecture, then the paper's warehouse plan, through timm's builder.

A :class:`Family` says how one architecture becomes a KernelWarehouse model: which timm model it
starts from, which of its layers go to which warehouse (``warehouse_keys``), the default warehouse
options per budget, how it adapts to small images, and how the reference implementation named its
modules. :func:`build` runs timm's ``build_model_with_cfg`` with a builder that creates timm's static
model and plans its warehouses, so ``pretrained_cfg``, ``features_only``, ``reset_classifier``,
``forward_features`` / ``forward_head`` / ``forward_intermediates`` and gradient checkpointing are
timm's own. ``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=PATH)`` loads a checkpoint of
the reference implementation, one of ours, or a static timm state dict (a warm start: exact at tau = 1
for budgets >= 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Mapping

import timm
import torch.nn as nn
from timm.models import build_model_with_cfg, get_pretrained_cfg, register_model, register_notrace_module

from ..core.build import STATIC_TO_KW, build_kernelwarehouse
from ..core.plan import RATIO_NAMES
from ..core.temperature import anneal
from .paper import PAPER, REFERENCE_PARAMS
from .registry import no_budget_error, parse_budget, register_zoo

SMALL_INPUT = 32  # the image size a ``small_input`` model's cfg states
PLAN_OPTIONS = frozenset(RATIO_NAMES) | {"sharing_range"}
# what the cfg of the static timm model says about weights it distributes; ours distribute none
# and the test-time sizes of timm's training recipes; our evaluation is the paper's: a 0.875 centre crop
DROPPED_CFG_KEYS = (
    "url",
    "hf_hub_id",
    "tag",
    "license",
    "origin_url",
    "paper_ids",
    "paper_name",
    "notes",
    "hf_hub_filename",
    "source",
    "file",
    "state_dict",
    "test_input_size",
    "test_crop_pct",
)
EVAL_CROP_PCT = 0.875


@dataclass(frozen=True)
class Family:
    """One architecture of the zoo. Callables receive the static timm model (after ``small_input``).

    Attributes:
        timm_name: the timm model the static architecture is (``"resnet18"``).
        warehouse_keys: (model, budget) -> {module path: warehouse key} of the dynamic layers.
        plan_options: budget -> default warehouse options (``sharing_range``, ratios, ``norm``).
        small_input: adapts a model in place for 8x8 to 32x32 images (stride 1 stem); may be None.
        reference_names: model -> {module path of the reference implementation: ours}, for
            loading its checkpoints; identity where the names agree.
        timm_kwargs: fixed arguments of the timm model (``conv_mlp=True`` for ConvNeXt).
        feature_cfg: timm's feature-extraction options for ``features_only``.
        small_input_kwargs: arguments replacing ``small_input`` where timm has them (DeiT).
        small_input_reduction: the final feature stride of a small-input model.
        extra_options: options timm's model lacks, each applied to the built model in place
            (``stem_width`` of a ResNet's plain stem).
        title: the architecture's name in the models' docstrings (``"ResNet18"``).
        description: what the static model is, after "timm's" in its docstring.
        dynamic_layers: the layers the KernelWarehouse model makes dynamic, in its docstring.
    """

    timm_name: str
    warehouse_keys: Callable[[nn.Module, Fraction], dict[str, str]]
    plan_options: Callable[[Fraction], dict[str, Any]]
    small_input: Callable[[nn.Module], None] | None = None
    reference_names: Callable[[nn.Module], dict[str, str]] = lambda model: {}
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    feature_cfg: Mapping[str, Any] = field(default_factory=dict)
    small_input_kwargs: Mapping[str, Any] = field(default_factory=dict)
    small_input_reduction: int = 8
    extra_options: Mapping[str, Callable[[nn.Module, Any], None]] = field(default_factory=dict)
    title: str = ""
    description: str = ""
    dynamic_layers: str = "convs"


for _layer in set(
    STATIC_TO_KW.values()
):  # leaves of timm's FX feature extraction, as timm's own dynamic layers
    register_notrace_module(_layer)

FAMILIES: dict[str, Family] = {}  # model name (timm's variant) -> its family, filled as models are built


def family_of(model: nn.Module) -> Family | None:
    """The family of a zoo model, from the architecture its ``pretrained_cfg`` names (None otherwise)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return FAMILIES.get(cfg.get("architecture", ""))


def static_model(family: Family, small_input: bool = False, **kwargs: Any) -> nn.Module:
    """timm's static model of ``family`` (no weights), adapted for small images if asked."""
    if small_input:
        kwargs = {**family.small_input_kwargs, **kwargs}
    extras = {k: kwargs.pop(k) for k in list(kwargs) if k in family.extra_options}
    model = timm.create_model(family.timm_name, pretrained=False, **{**family.timm_kwargs, **kwargs})
    for name, value in extras.items():
        family.extra_options[name](model, value)
    if small_input and family.small_input is not None:
        family.small_input(model)
    return model


def kw_model(family: Family, budget: Any = 1, small_input: bool = False, **kwargs: Any) -> nn.Module:
    """timm's model of ``family`` with the paper's KernelWarehouse layers at ``budget``."""
    budget = parse_budget(budget)
    plan = {k: kwargs.pop(k) for k in list(kwargs) if k in PLAN_OPTIONS}
    model = static_model(family, small_input, **kwargs)
    options = {"cell_num_ratio": float(budget), **family.plan_options(budget), **plan}
    return build_kernelwarehouse(model, family.warehouse_keys(model, budget), **options)


def default_cfg(family: Family, first_conv: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The pretrained cfg of a zoo model: timm's for the static architecture (input size, mean and
    std, pool size, classifier), without its weights, with the paper's evaluation crop; ``first_conv``
    where the stem is dynamic."""
    cfg = {
        k: v for k, v in get_pretrained_cfg(family.timm_name).to_dict().items() if k not in DROPPED_CFG_KEYS
    }
    cfg["crop_pct"] = EVAL_CROP_PCT
    if first_conv is not None:
        cfg["first_conv"] = first_conv
    return {**cfg, **overrides}


def build(
    variant: str, family: Family, pretrained: bool = False, dynamic: bool = True, **kwargs: Any
) -> nn.Module:
    """Build a registered zoo model through timm's ``build_model_with_cfg`` (timm entry points call this).

    ``anneal_steps=N`` anneals tau from 1 to 0 over N training steps (:func:`kernelwarehouse.anneal`).
    """
    FAMILIES.setdefault(variant, family)
    anneal_steps = kwargs.pop("anneal_steps", None)
    if not dynamic and "budget" in kwargs:
        raise no_budget_error(variant)
    if anneal_steps is not None and not dynamic:
        raise ValueError(f"{variant} is a static model: it has no temperature to anneal")
    small = bool(kwargs.get("small_input", False))
    if small and family.small_input_kwargs:
        for key, value in family.small_input_kwargs.items():  # before timm fills in the cfg's img_size
            kwargs.setdefault(key, value)

    def create(**model_kwargs: Any) -> nn.Module:
        model = kw_model(family, **model_kwargs) if dynamic else static_model(family, **model_kwargs)
        if anneal_steps is not None:
            anneal(model, int(anneal_steps))
        return model

    from ..compat.reference import pretrained_filter

    model = build_model_with_cfg(
        create,
        variant,
        pretrained,
        feature_cfg=dict(family.feature_cfg),
        pretrained_filter_fn=pretrained_filter(family),
        **kwargs,
    )
    if small and not kwargs.get("features_only"):
        _small_input_cfg(model, kwargs.get("in_chans", 3), family.small_input_reduction)
    return model


def register_zoo_models(module: str, **families: Family) -> list[Callable[..., nn.Module]]:
    """The models of a family module, registered: for each ``name=family``, timm's static model
    ``name`` and its KernelWarehouse version ``kw_{name}``; returned in the order they are registered,
    the static models first.

    Each is an entry point ``name(pretrained=False, **kwargs)`` building through :func:`build`,
    registered in the zoo with its numbers in :mod:`.paper`; a KernelWarehouse
    model is registered with timm as well (``timm.create_model``). ``module`` is the family
    module's ``__name__``: the entry points belong to it, and timm reads its ``default_cfgs``."""
    models = [(name, family, False) for name, family in families.items()]
    models += [(f"kw_{name}", family, True) for name, family in families.items()]
    entries = []
    for name, family, dynamic in models:
        entry = _entry_point(name if dynamic else family.timm_name, family, dynamic)
        entry.__name__ = entry.__qualname__ = name
        entry.__module__ = module
        entry.__doc__ = (
            f"KW-{family.title} at ``budget`` (default 1): timm's {family.title} with KernelWarehouse "
            f"{family.dynamic_layers}."
            if dynamic
            else f"{family.title}, timm's {family.description}."
        )
        if dynamic:
            entry = register_model(entry)
        register_zoo(PAPER.get(name), REFERENCE_PARAMS.get(name))(entry)
        entries.append(entry)
    return entries


def _entry_point(variant: str, family: Family, dynamic: bool) -> Callable[..., nn.Module]:
    """``build(variant, family, ...)``: the static model with ``dynamic=False``."""
    options = {} if dynamic else {"dynamic": False}

    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return build(variant, family, pretrained, **options, **kwargs)

    return entry


def _small_input_cfg(model: nn.Module, in_chans: int, reduction: int) -> None:
    """A small-input model's cfg gives the 32x32 input it is made for and the pool size that follows."""
    cfg = dict(model.pretrained_cfg)
    cfg["input_size"] = (in_chans, SMALL_INPUT, SMALL_INPUT)
    if cfg.get("pool_size") is not None:
        cfg["pool_size"] = (SMALL_INPUT // reduction,) * 2
    model.pretrained_cfg = model.default_cfg = cfg


def module_renamer(names: Mapping[str, str]) -> Callable[[str], str]:
    """A function renaming a parameter key by the longest module-path prefix in ``names``."""
    if not names:
        return lambda key: key
    pattern = re.compile(
        "^(" + "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True)) + r")(?=\.)"
    )
    return lambda key: pattern.sub(lambda m: names[m.group(1)], key, count=1)
