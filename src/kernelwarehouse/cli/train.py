"""``kw train``: train a registered model on digits, a CIFAR folder or an ImageFolder tree.

Options left out take the recipe's value (``--recipe``), else, when resuming, the checkpoint's,
else the defaults. Under ``torchrun --nproc_per_node N $(which kw) train ...`` it trains with DDP.
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..models.registry import format_budget, model_entry, parse_budget
from ..train.checkpoint import load_checkpoint
from ..train.recipes import get_recipe
from ..train.config import TrainConfig
from ..train.trainer import Trainer
from . import CommandError, add_command, add_switch

# option name -> TrainConfig field, for the options that map one to one
FIELDS = {f.name for f in fields(TrainConfig)}


def parse_model_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``["stem_width=8", "norm=layer"]`` -> {"stem_width": 8, "norm": "layer"}."""
    kwargs: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise CommandError(f"--model-kwargs expects key=value pairs, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def explicit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig values the user gave on the command line."""
    values = {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}
    if args.model_kwargs is not None:
        values["model_kwargs"] = parse_model_kwargs(args.model_kwargs)
    if "budget" in values:
        values["budget"] = str(parse_budget(values["budget"]))
    return values


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, Path | None]:
    """Merge defaults < checkpoint (when resuming) < recipe < explicit options, and validate."""
    explicit = explicit_options(args)
    values: dict[str, Any] = {}
    resume = None
    if args.resume:
        resume = Path(args.resume)
        if resume.is_dir():
            resume = resume / "last.pt"
        values.update(load_checkpoint(resume)["config"])
        values.setdefault("output", str(resume.parent))
        if "output" not in explicit:
            values["output"] = str(resume.parent)
    recipe = explicit.get("recipe")
    if recipe is not None:
        values.update(get_recipe(recipe).options())
    values.update(explicit)
    if "model" not in values:
        raise CommandError("--model is required (or --resume a checkpoint)")
    entry = model_entry(values["model"])
    try:
        entry.check_budget(values.get("budget"))
    except ValueError as error:
        raise CommandError(str(error)) from None
    if "output" not in values:
        budget = values.get("budget")
        suffix = f"-{format_budget(parse_budget(budget))}" if budget is not None else ""
        values["output"] = str(Path("runs") / f"{values['model']}{suffix}")
    config = TrainConfig.from_dict(values)
    if resume is None and (Path(config.output) / "last.pt").exists():
        raise CommandError(
            f"{config.output} already holds a run (last.pt); resume it with --resume "
            f"{Path(config.output) / 'last.pt'} or choose another --output"
        )
    return config, resume


def run(args: argparse.Namespace) -> int:
    config, resume = resolve_config(args)
    try:
        trainer = Trainer(config, resume=resume, progress=args.progress)
        history = trainer.fit()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank tears its process group down while another still talks to it
    except FloatingPointError as error:
        raise CommandError(str(error)) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if trainer.env.is_main and history:
        best = trainer.best
        print(
            f"done: {config.model} {format_budget(parse_budget(config.budget)) if config.budget else ''} "
            f"best val top-1 {best['top1']:.2f}% (epoch {best['epoch']}), {trainer.num_parameters:,} params; "
            f"checkpoints in {config.output}"
        )
    return 0


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``kw train`` that ``kw demo`` shares."""
    parser.add_argument("--epochs", type=int, help="epochs to train (recipe or 10)")
    parser.add_argument("--batch-size", type=int, help="batch size per process (recipe or 64)")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--seed", type=int, help="random seed (0)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), help="where to train (auto)")
    parser.add_argument("--workers", type=int, help="data-loading processes per training process (0)")
    parser.add_argument("--temp-epochs", type=float, help="epochs over which tau anneals from 1 to 0")
    parser.add_argument(
        "--baseline-temp-epochs",
        type=float,
        help="epochs over which DY-Conv's / ODConv's temperature falls from 30 to 1 "
        "(default: --temp-epochs; the demo: the whole run)",
    )
    parser.add_argument("--limit-train", type=int, help="train on the first N samples of a fixed shuffle")
    parser.add_argument("--limit-val", type=int, help="evaluate on the first N samples of a fixed shuffle")
    parser.add_argument(
        "--model-kwargs",
        nargs="*",
        metavar="KEY=VALUE",
        help="extra options for create_model, e.g. stem_width=8 channels=(8,16,32,64) norm=layer",
    )
    add_switch(parser, "--progress", "progress bars (default: when stderr is a terminal)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = add_command(sub, "train", "train a model (digits, CIFAR folder or ImageFolder tree)", __doc__)
    parser.add_argument("--model", help="registered model name (see kw models)")
    parser.add_argument("--budget", help="KernelWarehouse budget b, e.g. 1/2, 0.5, 4x (kw_* models)")
    parser.add_argument(
        "--data", help="'digits', a CIFAR-10/100 python folder or an ImageFolder tree (train/, val/)"
    )
    parser.add_argument("--output", help="run directory (default runs/MODEL-BUDGET)")
    parser.add_argument("--resume", help="checkpoint (or run directory) to continue from")
    parser.add_argument("--recipe", help="named recipe (see kw recipes)")
    add_switch(parser, "--amp", "mixed precision (CUDA)")
    add_switch(parser, "--ema", "keep and evaluate an exponential moving average of the weights")
    parser.add_argument("--ema-decay", type=float)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"))
    parser.add_argument("--momentum", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--scheduler", choices=("cosine", "step", "constant"))
    parser.add_argument("--warmup-epochs", type=float)
    parser.add_argument("--label-smoothing", type=float)
    parser.add_argument("--drop-path", type=float)
    parser.add_argument("--mixup", type=float, help="mixup alpha (timm's Mixup; 0 = off)")
    parser.add_argument("--cutmix", type=float, help="cutmix alpha (timm's Mixup; 0 = off)")
    parser.add_argument(
        "--rand-augment", help="timm RandAugment policy for ImageFolder data, e.g. rand-m9-mstd0.5-inc1"
    )
    parser.add_argument("--random-erasing", type=float, help="random erasing probability (ImageFolder data)")
    parser.add_argument("--image-size", type=int, help="ImageFolder image size (recipe or 224)")
    add_switch(parser, "--channels-last", "channels-last memory format on CUDA")
    add_switch(parser, "--deterministic", "deterministic kernels (default on)")
    parser.add_argument("--log-interval", type=int, help="steps between entries of steps.csv (10)")
    add_switch(
        parser, "--skip-unreadable", "skip images that cannot be read (counted per epoch) instead of stopping"
    )
    add_training_options(parser)
    parser.set_defaults(run=run)
