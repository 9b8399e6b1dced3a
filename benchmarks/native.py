"""Time the native kernels of every instruction-set variant this CPU runs against PyTorch's products.

    PYTHONPATH=src python benchmarks/native.py                  # 2 threads, KW-ResNet18 assembly shapes
    PYTHONPATH=src python benchmarks/native.py --threads 1 --variants avx2,portable

The shapes are those of KW-ResNet18's kernel assembly: (r, n) mixture rows with n cells of a warehouse,
(c_out, n, c_in) cells viewed output channel first (the strides of a warehouse), r = 16 samples x 9
kernel positions for a batch and 9 for one sample. ``mix_rows`` is timed against ``torch.bmm`` of the
rows expanded to (c_out, r, n) with the cells, ``rows_gradient`` against ``torch.bmm(grad, cells^T).sum(0)``
(the products :mod:`kernelwarehouse.core.assembly` runs without the kernels). Each figure is the median
of interleaved repeats in GMAC/s (multiply-adds r n c_out c_in per second), with its ratio to PyTorch's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch

import kernelwarehouse.native as native


def medians(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in turn, round after round (load that comes and goes
    falls on all of them alike)."""
    for fn in functions.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--variants",
        default=",".join(native.supported_variants()),
        help="comma-separated, of those this CPU runs (default: all of them)",
    )
    parser.add_argument(
        "--rows", default="144,9", help="mixture rows r: 16 samples x 9 positions, one sample"
    )
    parser.add_argument("--cells", default="27,36,56", help="warehouse cells n")
    parser.add_argument("--channels", default="64,128,256,512", help="c_out = c_in of the layers")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [name for name in args.variants.split(",") if name]
    kernels = {name: native.load(name) for name in names}
    missing = [name for name, k in kernels.items() if k is None]
    if missing:
        print(f"kernels not available: {', '.join(missing)}", file=sys.stderr)
        return 1
    print(
        f"{native.cpu_model()}, {args.threads} threads, torch {torch.__version__}; this process's variant "
        f"{native.variant()}, supported {', '.join(native.supported_variants())}"
    )
    print("GMAC/s, median of", args.repeats, "interleaved repeats, and the ratio to PyTorch's product")
    widths = [11, 17, 8] + [16] * len(names)

    def row(values: list[str]) -> str:
        return "".join(f"{v:>{w}s}" for v, w in zip(values, widths))

    def cells_of(shape: tuple[int, int, int], rate: dict[str, float]) -> list[str]:
        r, n, c = shape
        return [
            f"({r}, {n})",
            f"({c}, {n}, {c})",
            f"{rate['torch']:.1f}",
            *(f"{rate[name]:.1f} ({rate[name] / rate['torch']:.2f}x)" for name in names),
        ]

    results: dict[str, list[tuple[tuple[int, int, int], dict[str, float]]]] = {
        "mix_rows": [],
        "rows_gradient": [],
    }
    for r in (int(v) for v in args.rows.split(",")):
        for c in (int(v) for v in args.channels.split(",")):
            for n in (int(v) for v in args.cells.split(",")):
                torch.manual_seed(0)
                rows = torch.randn(r, n)
                cells = torch.randn(n, c, c).transpose(0, 1)  # (c_out, n, c_in), a warehouse's strides
                grad, out = torch.randn(c, r, c), torch.empty(c, r, c)
                mix = {"torch": lambda: torch.bmm(rows.expand(c, -1, -1), cells, out=out)}
                mix.update({name: lambda k=k: k.mix_rows(rows, cells, out) for name, k in kernels.items()})
                gradient = {"torch": lambda: torch.bmm(grad, cells.transpose(1, 2)).sum(0)}
                gradient.update(
                    {name: lambda k=k: k.rows_gradient(grad, cells) for name, k in kernels.items()}
                )
                for kernel, functions in (("mix_rows", mix), ("rows_gradient", gradient)):
                    seconds = medians(functions, args.repeats)
                    rate = {name: r * n * c * c / s / 1e9 for name, s in seconds.items()}
                    results[kernel].append(((r, n, c), rate))
                    print(f"{kernel:>14s} " + row(cells_of((r, n, c), rate)), file=sys.stderr, flush=True)
    for kernel, measured in results.items():
        print(f"\n{kernel}\n" + row(["rows", "cells", "torch", *names]))
        for shape, rate in measured:
            print(row(cells_of(shape, rate)))
        means = [
            statistics.geometric_mean([rate[name] / rate["torch"] for _, rate in measured]) for name in names
        ]
        print(row(["geomean", "", "", *(f"{mean:.2f}x" for mean in means)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
