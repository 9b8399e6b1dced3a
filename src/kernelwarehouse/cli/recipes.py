"""``kw recipes``: the named training recipes (the paper's ImageNet recipes and the demo's)."""

from __future__ import annotations

import argparse
import json

from ..train.recipes import RECIPES


def run(args: argparse.Namespace) -> int:
    if args.json:
        print(
            json.dumps(
                {name: {"description": r.description, **r.options()} for name, r in RECIPES.items()}, indent=2
            )
        )
        return 0
    header = (
        f"{'recipe':<12} {'epochs':>6} {'batch':>6} {'opt':>6} {'lr':>7} {'wd':>7} {'sched':>7} "
        f"{'warmup':>6} {'tau ep':>6} {'smooth':>6} {'ema':>4}"
    )
    print(header)
    print("-" * len(header))
    for name, recipe in RECIPES.items():
        o = recipe.options()
        print(
            f"{name:<12} {o['epochs']:>6} {o['batch_size']:>6} {o['optimizer']:>6} {o['lr']:>7g} "
            f"{o['weight_decay']:>7g} {o['scheduler']:>7} {o['warmup_epochs']:>6g} {o['temp_epochs']:>6g} "
            f"{o['label_smoothing']:>6g} {'yes' if o['ema'] else 'no':>4}"
        )
    print()
    for r in RECIPES.values():
        print(f"{r.name}: {r.description}")
    print("\nrun one: kw train --recipe resnet --model kw_resnet18 --budget 1 --data PATH/TO/IMAGENET")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("recipes", help="list the named training recipes")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)
