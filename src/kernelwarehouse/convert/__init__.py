"""Turn the convolutions (and a transformer's linears) of any model into KernelWarehouse layers.

``convert(model, budget)`` finds a model's static layers, groups them into shared warehouses and
puts KernelWarehouse layers (Li & Yao, ICML 2024) in their places under the same module paths.
Grouping follows the paper (Sec. 3.2): neighbouring layers of one stage -- consecutive layers
between resolution changes, found by running the model once on a probe input -- share a
warehouse. Within a stage, layers are packed into warehouses so that the attention stays small:
a layer's attention has a fixed part (its first linear) and a part that grows with the warehouse
(its second linear has m * (n + 1) outputs, quadratic in cells over a warehouse of small cells).
A layer joins the warehouse whose attention grows least, as long as that warehouse's attention
stays within ``max_attention`` of its static weights, and otherwise opens a new one with the
widest attention (reduction 1/16, 1/32, ...) that leaves room for sharing. Layers whose attention
alone would exceed that share (a 3-channel stem, a thin squeeze-excitation conv, a depthwise
conv) stay static, unless named by ``include``.

With ``warm_start=True`` the static weights are written into the warehouse slots that the
temperature initialisation beta points at: at tau = 1 every cell's mixture is exactly its beta row,
so the converted model computes what the original computed. Anneal tau with
:class:`~kernelwarehouse.core.temperature.TemperatureSchedule` while fine-tuning.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..core.build import apply_plan
from .planning import Conversion, plan_conversion
from .warm_start import load_static_state_dict, load_static_weights


def convert(
    model: nn.Module,
    budget: Any = 1.0,
    warm_start: bool = False,
    *args: Any,
    verbose: bool = False,
    method: str = "kw",
    kernel_num: int = 4,
    **kwargs: Any,
) -> nn.Module:
    """Replace ``model``'s static layers by KernelWarehouse layers, in place; returns ``model``.

    The layers and their warehouses are planned by :func:`plan_conversion`, which takes ``model``,
    ``budget`` and the further arguments: ``include``, ``exclude``, ``sharing`` and ``norm``
    (positionally after ``warm_start``, or by name), and by name ``linear``, ``example_input``,
    ``max_attention`` and warehouse options.

    Args:
        budget: b = n / m of every warehouse (``cell_num_ratio``): 1/4 to 4, a number or ``"1/2"``.
        warm_start: copy the static weights into the warehouses so that at tau = 1 the model
            computes what it computed before (exact for b >= 1, the closest it can for b < 1, with
            a warning); tau is set to 1.
        include / exclude: module-path glob patterns (``"layer4"``, ``"*.conv2"``); a pattern
            also matches every layer below the module it names. Included layers are converted
            even where their attention is costly.
        sharing: ``"stage"`` (layers between resolution changes), ``"kind"`` (the same path up to
            block indices, e.g. every ``blocks.*.attn.qkv``), ``"layer"`` (no sharing), ``"model"``
            (one pool), or a function from module path to group name (None keeps a layer static).
        norm: the attention's norm (``"batch"``, ``"layer"``, ``"group"``, ``"none"``).
        linear: also convert ``nn.Linear``. None: the Linear layers repeated across blocks, when they
            hold more weights than the convolutions (transformers, ConvNeXt); True: every Linear.
        example_input: the probe input the stages are read from (default: one 224x224 image).
        max_attention: the share of a warehouse's static weights its layers' attention may take.
        method: ``"kw"``, or a baseline (``"odconv"``, ``"dyconv"``, ``"condconv"``) with
            ``kernel_num`` kernels put on the same Conv2d layers KernelWarehouse would take.
        further keywords: warehouse options (``cell_inplane_ratio``, ``reduction``, ...), one value
            or a mapping from warehouse name to value.
    """
    conversion = plan_conversion(model, budget, *args, **kwargs)
    # the static layers the plan replaces, by module path in the plan's (module) order
    originals = {layer.name: model.get_submodule(layer.name) for layer in conversion.plan.layers}
    if method != "kw":
        from ..baselines.models import convert_to_baseline  # the baselines register models on import

        return convert_to_baseline(model, originals, method, kernel_num, warm_start)
    apply_plan(model, conversion.plan)
    for name, static in originals.items():  # a new layer trains or evaluates as the one it replaces
        model.get_submodule(name).train(static.training)
    if verbose:
        print(conversion)
    if warm_start:
        load_static_weights(model, originals, conversion.plan)
    return model


__all__ = ["Conversion", "convert", "load_static_state_dict", "load_static_weights", "plan_conversion"]
