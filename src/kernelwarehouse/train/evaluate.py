"""Evaluation (loss, top-1, top-5) and a multiply-add count that sees KernelWarehouse assembly."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..core.layers import KWLayer, KWLinear


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy (%) over ``loader``; summed over every process
    when torch.distributed is initialised (each process evaluates its own shard)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, samples
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                               hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                               torch.tensor(float(len(labels)), dtype=torch.float64, device=device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    count = max(count, 1.0)
    return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds per sample of one forward pass at ``input_shape`` (C, H, W).

    Counts convolutions and linear layers; a KernelWarehouse layer adds its attention branch and the
    assembly of its weight from n warehouse cells (n * |W|, SPEC section 4), which common counters
    miss.
    """
    macs = 0

    def conv_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, (nn.Linear, KWLinear)):
            in_features = module.in_features
            macs += output.numel() // output.shape[0] * in_features
        else:
            weight_shape = module.weight_shape if isinstance(module, KWLayer) else module.weight.shape
            macs += output.numel() // output.shape[0] * math.prod(weight_shape[1:])
        if isinstance(module, KWLayer):
            att, plan = module.attention, module.plan
            macs += att.fc1.in_features * att.fc1.out_features + att.fc2.in_features * att.fc2.out_features
            if plan.num_basis:
                macs += plan.num_cells * plan.num_basis * plan.num_nonlocal
            macs += plan.warehouse_cells * math.prod(module.weight_shape)

    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, KWLayer)
    inside_attention = {id(m) for layer in model.modules() if isinstance(layer, KWLayer)
                        for m in layer.attention.modules()}
    hooks = [m.register_forward_hook(conv_hook) for m in model.modules()
             if isinstance(m, kinds) and id(m) not in inside_attention]
    was_training = model.training
    try:
        model.eval()
        parameter = next(model.parameters())
        model(torch.zeros(2, *input_shape, device=parameter.device, dtype=parameter.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return macs
