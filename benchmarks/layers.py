"""Time every KernelWarehouse convolution of a model along each execution path, beside a static
convolution of the same shape: what ``auto`` measures per layer, and the figures behind the
fixed rule's thresholds (``kernelwarehouse.tuning``). An ``auto`` column also names its choice.

    PYTHONPATH=src python benchmarks/layers.py                       # kw_resnet18 1x, batch 16, CPU
    PYTHONPATH=src python benchmarks/layers.py --batch-size 1 --train-paths ""

Each cell is a median in ms (and its ratio to the static convolution); inference runs without
gradients, training is forward and backward of the layer alone (input, mixture weights and warehouse
require gradients). The attention branch is not timed: every path shares it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

import kernelwarehouse as kw
from kernelwarehouse.core.execution import kw_conv, resolve_path
from kernelwarehouse.core.paths import check_choice
from kernelwarehouse.models.registry import parse_budget


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def layer_inputs(model: torch.nn.Module, image_size: int) -> dict[str, torch.Size]:
    shapes: dict[str, torch.Size] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            shapes[name] = args[0].shape

        return hook

    hooks = [layer.register_forward_hook(record(name)) for name, layer in kw.kw_layers(model)]
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="kw_resnet18")
    parser.add_argument("--budget", default="1")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--paths",
        default="grouped,unfold,mix,loop,patches,fused,auto",
        help="inference paths, comma-separated (PATH@torch: with PyTorch's products)",
    )
    parser.add_argument(
        "--train-paths",
        default="grouped,loop:slices,loop:sample,loop:mix,patches:slices,fused:tiles,auto",
        help="training paths ('' for none); loop:FORM names the loop path's backward form",
    )
    parser.add_argument("--only", default="", help="time only layers whose name contains this")
    args = parser.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    train_paths = [p for p in args.train_paths.split(",") if p]
    for path in paths + train_paths:
        if path != "auto":
            try:
                check_choice(path)
            except ValueError as error:
                parser.error(str(error))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = kw.create_model(args.model, budget=parse_budget(args.budget))
    kw.set_temperature(model, 0.5)
    shapes = layer_inputs(model, args.image_size)

    header = (
        ["layer", "L", "n", "static"]
        + paths
        + (["static train"] + [f"train {p}" for p in train_paths] if train_paths else [])
    )
    print("| " + " | ".join(header) + " |")
    print("|---" * 3 + "|" + "---:|" * (len(header) - 3))
    for name, layer in kw.kw_layers(model):
        if not isinstance(layer, kw.KWConv2d) or layer._pad is not None or args.only not in name:
            continue  # (layers padded outside the convolution, reflect and the like, are left out)
        x = torch.randn(args.batch_size, *shapes[name][1:])
        weight = torch.randn(layer.weight_shape, requires_grad=True)
        cells = layer.warehouse.weight
        geo = layer._geometry
        attention = layer.mixture(x.mean(dim=(2, 3))).detach()

        def static() -> torch.Tensor:
            return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)

        with torch.no_grad():
            size = static().shape[2:].numel()
            base = median_ms(static, args.repeats)
            row = [name, str(size), str(cells.shape[0]), f"{base:.2f}"]
            for path in paths:
                ms = median_ms(lambda: kw_conv(x, attention, cells, None, geo, path), args.repeats)
                chosen = f" {resolve_path(x, attention, cells, geo)}" if path == "auto" else ""
                row.append(f"{ms:.2f} ({ms / base:.1f}x){chosen}")
        if train_paths:
            inputs, mixture = x.clone().requires_grad_(), attention.clone().requires_grad_()

            def train(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
                return lambda: fn().sum().backward()

            base = median_ms(
                train(
                    lambda: F.conv2d(
                        inputs, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups
                    )
                ),
                args.repeats,
            )
            row.append(f"{base:.2f}")
            for path in train_paths:
                ms = median_ms(train(lambda: kw_conv(inputs, mixture, cells, None, geo, path)), args.repeats)
                chosen = f" {resolve_path(inputs, mixture, cells, geo)}" if path == "auto" else ""
                row.append(f"{ms:.2f} ({ms / base:.1f}x){chosen}")
        print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
