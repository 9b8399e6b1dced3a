"""``kw models``: every model and budget, our parameter count beside the paper's."""

from __future__ import annotations

import argparse
import json

from ..models.registry import create_model, format_budget, list_models, model_entry


def model_table() -> list[dict]:
    rows = []
    for name in list_models():
        entry = model_entry(name)
        if not (entry.paper or entry.reference_params):  # not one of the paper's tables
            continue
        for budget in entry.budgets:
            baseline = entry.kind == "baseline"
            model = create_model(name, kernel_num=budget) if baseline else create_model(name, budget=budget)
            params = sum(p.numel() for p in model.parameters())
            paper_m, top1 = entry.paper.get(budget, (None, None))
            reference = entry.reference_params.get(budget)
            rows.append(
                {
                    "model": name,
                    "budget": f"K={budget}" if baseline else format_budget(budget),
                    "params": params,
                    "paper_params_m": paper_m,
                    "reference_params": reference,
                    "matches_reference": params == reference,
                    "paper_top1": top1,
                }
            )
    return rows


def run(args: argparse.Namespace) -> int:
    rows = model_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = (
        f"{'model':<22} {'budget':>7} {'params':>12} {'(M)':>7} {'paper (M)':>9} {'reference':>11}  "
        f"{'top-1':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        mark = "=" if r["matches_reference"] else "!"
        reference = (
            f"{r['reference_params']:>11,}{mark}" if r["reference_params"] is not None else f"{'-':>12}"
        )
        top1 = f"{r['paper_top1']:.2f}" if r["paper_top1"] else "-"
        paper = f"{r['paper_params_m']:>9.2f}" if r["paper_params_m"] is not None else f"{'-':>9}"
        print(
            f"{r['model']:<22} {r['budget']:>7} {r['params']:>12,} {r['params'] / 1e6:>7.2f} "
            f"{paper} {reference} {top1:>6}"
        )
    print(
        "\n'=' our count equals the reference implementation's exactly; top-1: the paper's ImageNet result;"
        "\nK=: a CondConv / DY-Conv / ODConv baseline with K kernels (paper: the ODConv authors' numbers)"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("models", help="list the models with parameter counts")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)
