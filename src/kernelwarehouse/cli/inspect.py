"""``kw inspect``: what a trained KernelWarehouse model's attentions learned, as plots and a summary."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..train.data import load_data
from ..train.inspection import attention_statistics, save_attention_plots, summary_text
from .eval import load_trained


def run(args: argparse.Namespace) -> int:
    model, config, state = load_trained(args.checkpoint, args.ema)
    _, val, _ = load_data(args.data or config.data, config.image_size)
    count = min(args.samples, len(val))
    images = torch.stack([val[i][0] for i in range(count)])
    stats = attention_statistics(model, images)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    text = (
        f"{config.model} budget {config.budget or 'default'}, epoch {state['epoch']}, "
        f"{count} validation samples of {args.data or config.data}\n\n{summary_text(stats, model)}\n"
    )
    (output / "summary.txt").write_text(text)
    plots = save_attention_plots(stats, output)
    print(text)
    print(f"wrote {output / 'summary.txt'} and {len(plots)} plots: {', '.join(p.name for p in plots)}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("inspect", help="plot the learned attentions and warehouse usage of a checkpoint")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by kw train")
    parser.add_argument("--output", required=True, help="directory for the plots and summary.txt")
    parser.add_argument("--data", help="dataset whose validation images are fed (default: the training data)")
    parser.add_argument("--samples", type=int, default=256, help="validation images to average over (256)")
    parser.add_argument("--ema", action="store_true", help="inspect the EMA weights")
    parser.set_defaults(run=run)
