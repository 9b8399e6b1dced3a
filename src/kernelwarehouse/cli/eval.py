"""``kw eval``: top-1, top-5, loss, parameters and multiply-adds of a trained checkpoint."""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.data import DataLoader

from ..models.registry import format_budget, parse_budget
from ..train.checkpoint import load_checkpoint
from ..train.data import DataInfo, EpochBatches, load_data
from ..bench import count_macs
from ..train.evaluate import count_parameters, evaluate
from ..train.config import TrainConfig
from ..train.environment import resolve_device
from ..train.trainer import build_model
from . import CommandError


def load_trained(checkpoint: str, ema: bool = False) -> tuple[torch.nn.Module, TrainConfig, dict]:
    """The model of a training checkpoint with its trained weights (EMA weights with ``ema``)."""
    state = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict(state["config"])
    model = build_model(config, DataInfo(**state["data_info"]))
    if ema:
        if not state.get("ema"):
            raise CommandError(f"checkpoint {checkpoint!r} holds no EMA weights (trained without --ema)")
        model.load_state_dict(state["ema"]["module"])
    else:
        model.load_state_dict(state["model"])
    return model.eval(), config, state


def run(args: argparse.Namespace) -> int:
    model, config, state = load_trained(args.checkpoint, args.ema)
    data = args.data or config.data
    _, val, info = load_data(data, config.image_size, limit_val=args.limit_val)
    trained = state["data_info"]
    if (info.num_classes, info.in_chans) != (trained["num_classes"], trained["in_chans"]):
        raise CommandError(
            f"{data!r} has {info.num_classes} classes and {info.in_chans} channels; the checkpoint "
            f"was trained on {trained['num_classes']} classes and {trained['in_chans']} channels"
        )
    device = resolve_device(args.device)
    model.to(device)
    loader = DataLoader(
        val, batch_sampler=EpochBatches(len(val), args.batch_size, train=False), num_workers=args.workers
    )
    metrics = evaluate(model, loader, device)
    image_shape = (info.in_chans, info.image_size, info.image_size)
    result = {
        "checkpoint": args.checkpoint,
        "model": config.model,
        "budget": format_budget(parse_budget(config.budget)) if config.budget else None,
        "data": data,
        "samples": len(val),
        "epoch": state["epoch"],
        **metrics,
        "params": count_parameters(model),
        "macs": count_macs(model, image_shape).total,
        "input": list(image_shape),
        "weights": "ema" if args.ema else "model",
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        budget = f" {result['budget']}" if result["budget"] else ""
        print(f"{config.model}{budget} (epoch {state['epoch']}) on {data}, {len(val)} samples")
        print(f"  top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}")
        print(
            f"  params {result['params']:,}  MACs {result['macs']:,} per {'x'.join(map(str, image_shape))} "
            f"sample (kernel assembly and attention included)"
        )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="evaluate a checkpoint: top-1/top-5, loss, params, MACs")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by kw train")
    parser.add_argument(
        "--data", help="dataset (default: the one it was trained on); its validation split is used"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--limit-val", type=int, help="evaluate the first N samples of a fixed shuffle")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)
