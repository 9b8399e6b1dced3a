"""``kw bench``: params, MACs, latency and training memory of a model beside its static counterpart."""

from __future__ import annotations

import argparse
import json

from ..core.execution import PATHS


def run(args: argparse.Namespace) -> int:
    from ..bench.benchmark import benchmark, format_paths, format_table
    from . import CommandError

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CommandError(f"device {args.device!r} requested but CUDA is not available")
    result = benchmark(
        args.model,
        args.budget,
        batch_size=args.batch_size,
        image_size=args.image_size,
        device=args.device,
        threads=args.threads,
        repeats=args.repeats,
        memory_batch_size=args.memory_batch_size or None,
        tau=args.tau,
        path=args.path,
        amp=args.amp,
        native_kernels=not args.no_native,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['model']} {result['budget']} vs {result['static']} on {result['device']} "
        f"({result['threads']} threads), {result['image_size']}px, tau={result['tau']}, path={result['path']}"
        + (f", amp={result['amp']}" if result["amp"] else "")
        + (f", native kernels ({result['native_variant']})" if result["native_kernels"] else "")
        + (f", paths {result['path_choice']}" if result["path"] == "auto" else "")
    )
    print(format_table(result))
    if args.show_paths:
        print("\npath of each layer, per figure:\n" + format_paths(result))
    print("\nratios are medians of interleaved repeats in this process; absolute times depend on the machine")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="latency, memory and MACs against the static model")
    parser.add_argument("--model", default="kw_resnet18", help="a KernelWarehouse model (see kw models)")
    parser.add_argument("--budget", default="1", help="budget b, e.g. 1, 4, 1/2 (default 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch for latency (default 16)")
    parser.add_argument(
        "--memory-batch-size",
        type=int,
        default=32,
        help="batch for peak training memory; 0 skips it (default 32)",
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (median)")
    parser.add_argument("--tau", type=float, default=0.5, help="attention temperature")
    parser.add_argument(
        "--path",
        default="auto",
        help=f"execution path, one of {', '.join(PATHS)} or e.g. "
        "loop:slices (default auto: measured on this machine)",
    )
    parser.add_argument("--show-paths", action="store_true", help="print the path each layer ran, per figure")
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="autocast dtype")
    parser.add_argument(
        "--no-native",
        action="store_true",
        help="PyTorch's products in place of the native CPU kernels (kernelwarehouse.native)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)
