"""Evaluation: loss, top-1 and top-5 accuracy."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False
) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy (%) over ``loader``; summed over every process
    when torch.distributed is initialised (each process evaluates its own shard). A loader whose
    batches also count unreadable images (``collate_readable``) adds their number as ``unreadable``."""
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, samples, unreadable
    counting = False
    for batch in loader:
        images, labels = batch[0], batch[1]
        if len(batch) > 2:
            counting = True
            totals[4] += batch[2]
            if len(labels) == 0:
                continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
        totals[:4] += torch.stack(
            [
                F.cross_entropy(logits, labels, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                torch.tensor(float(len(labels)), dtype=torch.float64, device=device),
            ]
        )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, count, unreadable = totals.tolist()
    count = max(count, 1.0)
    metrics = {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count}
    if counting:
        metrics["unreadable"] = int(unreadable)
    return metrics


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
