"""Write the README's speed and memory table: KW-ResNet18 1x against torchvision's ResNet18.

    PYTHONPATH=src python benchmarks/run.py                    # CPU, 2 threads (the README's setting)
    PYTHONPATH=src python benchmarks/run.py --device cuda --amp bf16

Every figure is a median of interleaved repeats, as a ratio to the static model timed in the same
process; ``reference`` is the reference implementation's scheme (B assembled weights kept for
backward, one convolution with groups = B), ``auto`` this package's default execution, and
``auto-pytorch`` the same without the native CPU kernels (what a machine without a C compiler runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys

import torch

from kernelwarehouse import native
from kernelwarehouse.bench.benchmark import benchmark, format_paths


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and torch.cuda.device_count() else None
    flags = set(native.cpu_features().split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()
    return f"{native.cpu_model()} ({isa})" + (f", {gpu}" if gpu else "") + f", torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--memory-batch-size", type=int, default=32)
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None)
    parser.add_argument(
        "--paths",
        default="auto,reference",
        help="comma-separated execution paths; auto-pytorch: auto without the native kernels",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--show-paths", action="store_true", help="print the path each layer ran under auto")
    args = parser.parse_args(argv)

    results = {}
    for path in args.paths.split(","):
        results[path] = benchmark(
            "kw_resnet18",
            1,
            batch_size=args.batch_size,
            image_size=224,
            device=args.device,
            threads=args.threads if args.device == "cpu" else None,
            repeats=args.repeats,
            memory_batch_size=args.memory_batch_size,
            tau=0.5,
            path=path.removesuffix("-pytorch"),
            amp=args.amp,
            native_kernels=not path.endswith("-pytorch"),
        )
        print(f"done: {path}", file=sys.stderr)
    first = next(iter(results.values()))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    setting = f"{first['device']}" + (f", {first['threads']} threads" if first["device"] == "cpu" else "")
    setting += f", amp {args.amp}" if args.amp else ""
    kernels = f"native kernels: {native.variant() or 'none'}" if first["device"] == "cpu" else ""
    print(
        f"KW-ResNet18 1x vs {first['static']}, 224x224, tau = 0.5, {setting}; {when}; {machine()}; "
        f"{kernels}; "
        f"auto: {first['path_choice']}\n"
    )
    header = (
        "| figure | static | "
        + " | ".join(f"KW ({p})" for p in results)
        + " | "
        + " | ".join(f"ratio ({p})" for p in results)
        + " |"
    )
    print(header)
    print("|---|" + "---:|" * (1 + 2 * len(results)))
    for name, fig in first["figures"].items():
        digits = 3 if fig["unit"] in ("G", "M") else 1
        values = " | ".join(f"{r['figures'][name]['kw']:.{digits}f}" for r in results.values())
        ratios = " | ".join(f"{r['figures'][name]['ratio']:.2f}x" for r in results.values())
        print(f"| {name} ({fig['unit']}) | {fig['static']:.{digits}f} | {values} | {ratios} |")
    if "reference" in results:
        ref = results["reference"]["figures"]
        for path, r in results.items():
            if path != "reference":
                # each path ran beside its own static model: compare ratios, not times of different moments
                faster = ", ".join(
                    f"{name} {ref[name]['ratio'] / fig['ratio']:.2f}x"
                    for name, fig in r["figures"].items()
                    if fig["unit"] == "ms"
                )
                print(f"\n{path} against the reference scheme (ratio over ratio, times faster): {faster}")
    if args.show_paths:
        for path, r in results.items():
            if path.startswith("auto"):
                print(f"\npaths under {path}:\n{format_paths(r)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": when, "machine": machine(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
