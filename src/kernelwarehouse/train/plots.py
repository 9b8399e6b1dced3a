"""PNG plots of training runs (accuracy, loss, temperature) with matplotlib's file-only backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def run_colors(runs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """One colour per run, the same in every panel (a panel may leave runs out: the static model has
    no temperature)."""
    return {label: f"C{i}" for i, label in enumerate(runs)}


def plot_accuracy(ax, runs: dict[str, dict[str, Any]]) -> None:
    colors = run_colors(runs)
    for label, run in runs.items():
        ax.plot(
            *_series(run["history"], "val_top1"), marker="o", markersize=3, label=label, color=colors[label]
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_loss(ax, runs: dict[str, dict[str, Any]]) -> None:
    colors = run_colors(runs)
    for label, run in runs.items():
        color = colors[label]
        ax.plot(*_series(run["history"], "train_loss"), color=color, label=f"{label} train")
        ax.plot(*_series(run["history"], "val_loss"), color=color, linestyle="--", label=f"{label} val")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.set_title("loss (solid: train, dashed: validation)")
    ax.grid(alpha=0.3)


def plot_temperature(ax, runs: dict[str, dict[str, Any]]) -> None:
    colors = run_colors(runs)
    for label, run in runs.items():
        steps = [s for s in run.get("steps", []) if s.get("tau") is not None]
        if steps:
            ax.plot([s["epoch"] for s in steps], [s["tau"] for s in steps], label=label, color=colors[label])
    ax.set_xlabel("epoch")
    ax.set_ylabel("tau")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("temperature (set every step)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)


def save_run_plots(runs: dict[str, dict[str, Any]], output: str | Path) -> list[Path]:
    """``accuracy.png``, ``loss.png``, ``temperature.png`` and all three side by side in
    ``curves.png``; ``runs`` maps a label to {"history": per-epoch rows, "steps": per-step rows}."""
    plt = _pyplot()
    output = Path(output)
    written = []
    panels = {"accuracy": plot_accuracy, "loss": plot_loss, "temperature": plot_temperature}
    for name, draw in panels.items():
        fig, ax = plt.subplots(figsize=(5.5, 4))
        draw(ax, runs)
        fig.tight_layout()
        fig.savefig(output / f"{name}.png", dpi=100)
        plt.close(fig)
        written.append(output / f"{name}.png")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, draw in zip(axes, panels.values()):
        draw(ax, runs)
    fig.tight_layout()
    fig.savefig(output / "curves.png", dpi=80)
    plt.close(fig)
    written.append(output / "curves.png")
    return written
