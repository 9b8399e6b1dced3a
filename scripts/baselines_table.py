"""Print the README's table of methods: parameters and MACs per 224x224 sample of each model.

PYTHONPATH=src python scripts/baselines_table.py
"""

from __future__ import annotations

from kernelwarehouse.bench import count_macs
from kernelwarehouse.baselines.models import PUBLISHED
from kernelwarehouse.models import create_model, format_budget, model_entry

ROWS = [  # (model, budget or kernel_num)
    ("resnet18", None),
    ("kw_resnet18", 1),
    ("kw_resnet18", 4),
    ("condconv_resnet18", 4),
    ("dyconv_resnet18", 4),
    ("odconv_resnet18", 1),
    ("odconv_resnet18", 4),
    ("resnet50", None),
    ("kw_resnet50", 1),
    ("kw_resnet50", 4),
    ("odconv_resnet50", 1),
    ("odconv_resnet50", 4),
    ("mobilenetv2_100", None),
    ("kw_mobilenetv2_100", 1),
    ("kw_mobilenetv2_100", 4),
    ("odconv_mobilenetv2_100", 1),
    ("odconv_mobilenetv2_100", 4),
    ("mobilenetv2_050", None),
    ("kw_mobilenetv2_050", 1),
    ("kw_mobilenetv2_050", 4),
    ("odconv_mobilenetv2_050", 1),
    ("odconv_mobilenetv2_050", 4),
]


def main() -> None:
    print("| model | variant | params (M) | published (M) | GMACs | of which assembly | of which attention |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, variant in ROWS:
        entry = model_entry(name)
        if entry.kind == "baseline":
            model, label = create_model(name, kernel_num=variant), f"K={variant}"
            published = PUBLISHED[name][variant][0]
        else:
            model, label = create_model(name, budget=variant), format_budget(variant)
            published = entry.paper[variant][0]
        params = sum(p.numel() for p in model.parameters())
        macs = count_macs(model, (3, 224, 224))
        published = "-" if published is None else f"{published:.2f}"
        print(
            f"| {name} | {label} | {params / 1e6:.2f} | {published} | {macs.total / 1e9:.3f} | "
            f"{macs.assembly / 1e9:.3f} | {macs.attention / 1e9:.3f} |"
        )


if __name__ == "__main__":
    main()
