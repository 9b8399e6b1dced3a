"""What a trained KernelWarehouse model learned: its attentions over the warehouse cells.

For every KernelWarehouse layer, :func:`attention_statistics` records the mixture weights a (m
cells x n warehouse cells, Li & Yao, ICML 2024, Sec. 3.3) on a batch of real inputs and reduces
them to the mean weight (with sign), the mean magnitude, the share of negative weights and the
effective number of warehouse cells each kernel cell mixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..core.build import kw_layers
from ..core.temperature import get_temperature


@dataclass
class LayerAttention:
    """Attention statistics of one layer over a set of samples."""

    name: str
    warehouse: str
    mean: torch.Tensor  # (m, n) mean weight, signed
    magnitude: torch.Tensor  # (m, n) mean |weight|
    negative: float  # share of weights < 0
    effective_cells: float  # mean over cells of (sum |a|)^2 / sum a^2

    @property
    def usage(self) -> torch.Tensor:
        """(n,) how much of each warehouse cell the layer draws, summed over its cells."""
        return self.magnitude.sum(dim=0)


@torch.no_grad()
def attention_statistics(
    model: nn.Module, images: torch.Tensor, batch_size: int = 128
) -> list[LayerAttention]:
    """Run ``model`` (in eval mode) on ``images`` and summarise every KernelWarehouse layer's attention."""
    layers = kw_layers(model)
    if not layers:
        raise ValueError("model has no KernelWarehouse layers to inspect (a static model?)")
    sums: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            sums[name].append(output.detach().float().cpu())

        return record

    handles = [layer.attention.register_forward_hook(hook(name)) for name, layer in layers]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    stats = []
    for name, layer in layers:
        a = torch.cat(sums[name])  # (samples, m, n)
        abs_sum = a.abs().sum(dim=-1)
        sq_sum = a.pow(2).sum(dim=-1).clamp_min(1e-30)
        stats.append(
            LayerAttention(
                name,
                layer.plan.warehouse,
                a.mean(dim=0),
                a.abs().mean(dim=0),
                float((a < 0).float().mean()),
                float((abs_sum**2 / sq_sum).mean()),
            )
        )
    return stats


def summary_text(stats: list[LayerAttention], model: nn.Module) -> str:
    """A table per layer and per warehouse."""
    tau = get_temperature(model)
    lines = [f"temperature tau = {tau:.4f}" if tau is not None else "no temperature", ""]
    lines.append(
        f"{'layer':<28} {'warehouse':<22} {'m':>5} {'n':>5} {'eff. cells':>10} {'negative':>8} "
        f"{'top cells (usage)':<40}"
    )
    for s in stats:
        usage = s.usage
        top = torch.topk(usage, min(3, len(usage)))
        top_text = ", ".join(f"{int(i)} ({float(v):.2f})" for v, i in zip(top.values, top.indices))
        lines.append(
            f"{s.name:<28} {s.warehouse:<22} {s.mean.shape[0]:>5} {s.mean.shape[1]:>5} "
            f"{s.effective_cells:>10.2f} {100 * s.negative:>7.1f}% {top_text:<40}"
        )
    lines.append("")
    lines.append(f"{'warehouse':<22} {'n':>5} {'layers':>6} {'shared cells':>12} {'idle cells':>10}")
    for warehouse, members in _by_warehouse(stats).items():
        usage = torch.stack([s.usage for s in members])  # (layers, n)
        # a layer uses a cell when it draws at least its own average weight from it
        uses = usage >= usage.mean(dim=1, keepdim=True)
        total = usage.sum(dim=0)
        idle = int((total < 0.01 * total.max()).sum())
        lines.append(
            f"{warehouse:<22} {usage.shape[1]:>5} {len(members):>6} {int((uses.sum(0) > 1).sum()):>12} "
            f"{idle:>10}"
        )
    lines.append("")
    lines.append(
        "eff. cells: effective number of warehouse cells a kernel cell mixes, (sum|a|)^2 / sum a^2; "
        "negative: share of attention weights below 0 (the contrast CAF allows); shared cells: cells "
        "that two or more layers draw on at least their average weight; idle: cells under 1% of the "
        "most used one."
    )
    return "\n".join(lines)


def _by_warehouse(stats: list[LayerAttention]) -> dict[str, list[LayerAttention]]:
    groups: dict[str, list[LayerAttention]] = {}
    for s in stats:
        groups.setdefault(s.warehouse, []).append(s)
    return groups


def save_attention_plots(stats: list[LayerAttention], output: str | Path) -> list[Path]:
    """``attention_<warehouse>.png``: each layer's mean signed attention (cells x warehouse cells);
    ``warehouse_usage.png``: per warehouse, how much each layer draws from each cell (stacked)."""
    from .plots import _pyplot

    plt = _pyplot()
    output = Path(output)
    written = []
    groups = _by_warehouse(stats)
    for warehouse, members in groups.items():
        cols = min(len(members), 3)
        rows = -(-len(members) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
        for ax, s in zip(axes.flat, members):
            limit = float(s.mean.abs().max()) or 1.0
            image = ax.imshow(
                s.mean.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest"
            )
            ax.set_title(s.name, fontsize=9)
            ax.set_xlabel("warehouse cell")
            ax.set_ylabel("kernel cell")
            fig.colorbar(image, ax=ax, fraction=0.046)
        for ax in list(axes.flat)[len(members) :]:
            ax.axis("off")
        fig.suptitle(f"mean attention in warehouse {warehouse} (red > 0, blue < 0)")
        fig.tight_layout()
        path = output / f"attention_{warehouse}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 2.6 * len(groups)), squeeze=False)
    for ax, (warehouse, members) in zip(axes.flat, groups.items()):
        bottom = torch.zeros(members[0].mean.shape[1])
        for s in members:
            ax.bar(range(len(bottom)), s.usage.numpy(), bottom=bottom.numpy(), label=s.name, width=1.0)
            bottom += s.usage
        ax.set_title(f"{warehouse}: sum of |attention| per warehouse cell, by layer", fontsize=9)
        ax.set_xlim(-0.5, len(bottom) - 0.5)
        ax.legend(fontsize=6, ncol=4)
    axes.flat[-1].set_xlabel("warehouse cell")
    fig.tight_layout()
    path = output / "warehouse_usage.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    written.append(path)
    return written
