"""The fused ``triton`` path on one CUDA GPU: a correctness check, then KW-ResNet18 1x and KW-ResNet50
1x against the static ResNet18 / ResNet50 (torchvision's), the ``triton`` path beside the reference
implementation's scheme (``reference``: B assembled weights kept for backward, one convolution with
groups = B).

    PYTHONPATH=src python benchmarks/gpu.py                  # within 5 minutes on one GPU (see --time-budget)
    PYTHONPATH=src python benchmarks/gpu.py --paths triton,reference,auto --batches 64
    PYTHONPATH=src python benchmarks/gpu.py --device cpu --paths grouped,reference --models kw_resnet18 \
        --batches 2 --image-size 64 --repeats 1     # a dry run of the table on CPU (no triton there)

First every kernel (forward, input gradient, mixture and cell gradients) is compared with the
``reference`` path on the GPU, in fp32 (TF32 off), under bf16 and fp16 autocast and with a
channels-last input, and one whole KW-ResNet18 forward and backward. Then per model and batch: the
training step (SGD) in fp32 (TF32 as PyTorch's defaults leave it) and under bf16 autocast, given as
images/s, inference (fp32) and the peak memory of a training step; every time a median of
``--repeats`` interleaved runs, every ratio against the static model timed in the same run; and the
path each layer ran. A row that fails (out of memory, a compile error) prints why and the table goes on;
rows that would start after ``--time-budget`` seconds (280) are skipped by name, so one run ends within
5 minutes. Without a CUDA GPU the script says so and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
import time
import traceback
from collections import Counter
from typing import Any, Callable

import torch
import torch.nn as nn

import kernelwarehouse as kw
from kernelwarehouse.bench.benchmark import peak_memory, static_counterpart
from kernelwarehouse.core.build import chosen_paths
from kernelwarehouse.core.paths import REGISTRY
from kernelwarehouse.core.temperature import set_temperature

# correctness cases: (name, layer constructor, input shape, modes); few modes each, as every new
# combination of kernel, dtype and shape class compiles (seconds each) on a fresh machine
ALL_MODES = ("fp32", "bf16", "fp16", "fp32 channels-last")
CHECKS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], tuple[str, ...]]] = [
    ("3x3, 64->64, padding 1", lambda: kw.KWConv2d(64, 64, 3, padding=1), (8, 64, 14, 14), ALL_MODES),
    (
        "3x3 stride 2, 64->128",
        lambda: kw.KWConv2d(64, 128, 3, stride=2, padding=1),
        (8, 64, 15, 15),
        ("fp32", "bf16"),
    ),
    ("1x1 stride 2, 64->128", lambda: kw.KWConv2d(64, 128, 1, stride=2), (8, 64, 14, 14), ("fp32", "bf16")),
    ("7x7 stride 2, 3->64", lambda: kw.KWConv2d(3, 64, 7, stride=2, padding=3), (4, 3, 32, 32), ("fp32",)),
    (
        "3x3 dilation 2, groups 4",
        lambda: kw.KWConv2d(32, 64, 3, padding=2, dilation=2, groups=4),
        (3, 32, 9, 9),
        ("fp32",),
    ),
    (
        "3x3, whole-kernel cells, batch 1",
        lambda: kw.KWConv2d(32, 32, 3, padding=1, spatial_partition=False),
        (1, 32, 10, 10),
        ("fp32",),
    ),
    ("linear 256->100 over 7 tokens", lambda: kw.KWLinear(256, 100), (5, 7, 256), ("fp32", "bf16")),
]
DEVICE = torch.device("cuda")  # --device sets it
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3, "fp32 channels-last": 1e-4}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def check_layer(make: Callable[[], nn.Module], shape: tuple[int, ...], mode: str) -> list[float]:
    """Relative errors of the triton path's output and gradients (x, mixture, cells) against the
    reference path's, both under ``mode``."""
    torch.manual_seed(0)
    layer = make().cuda()
    x = torch.randn(*shape, device="cuda")
    if mode.endswith("channels-last"):
        x = x.to(memory_format=torch.channels_last)
    mixture = torch.randn(shape[0], layer.plan.num_cells, layer.warehouse.num_cells, device="cuda")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    runs = []
    for path in ("triton", "reference"):
        inputs = [t.detach().clone().requires_grad_() for t in (x, mixture, layer.warehouse.weight)]
        with torch.autocast("cuda", dtype=amp) if amp else contextlib.nullcontext():
            out = REGISTRY[path].forward(*inputs, layer._geometry, "", True)
        grad = torch.cos(torch.arange(out.numel(), device="cuda", dtype=torch.float32)).reshape(out.shape)
        runs.append([out, *torch.autograd.grad(out, inputs, grad.to(out.dtype))])
    return [relative(a, b) for a, b in zip(*runs)]


def correctness() -> bool:
    print("## Correctness: triton path against the reference path on this GPU\n")
    print("| layer | mode | output | input grad | mixture grad | cells grad | ok |")
    print("|---|---|---:|---:|---:|---:|---|")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    passed = True
    try:
        for name, make, shape, modes in CHECKS:
            for mode in modes:
                try:
                    errors = check_layer(make, shape, mode)
                    ok = all(e < TOLERANCE[mode] for e in errors)
                    cells = " | ".join(f"{e:.1e}" for e in errors)
                except Exception as error:  # noqa: BLE001 - report and go on
                    ok, cells = False, f"failed: {type(error).__name__}: {str(error)[:200]} | | |"
                passed &= ok
                print(f"| {name} | {mode} | {cells} | {'yes' if ok else 'NO'} |", flush=True)
        try:  # a whole model, forward and backward
            torch.manual_seed(0)
            model = kw.create_model("kw_resnet18", budget=1).cuda()
            set_temperature(model, 0.5)
            model.eval()  # batch statistics of a few samples on tiny maps would amplify rounding differences
            x = torch.randn(4, 3, 64, 64, device="cuda")
            results = []
            for path in ("triton", "reference"):
                model.zero_grad()
                with kw.execution_path(path):
                    out = model(x)
                out.square().mean().backward()
                grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
                results.append((out.detach(), grads))
            worst_grad = max(relative(a, b) for a, b in zip(results[0][1], results[1][1]))
            out_error = relative(results[0][0], results[1][0])
            ok = out_error < 1e-4 and worst_grad < 1e-3
            print(
                f"| KW-ResNet18 1x (eval mode), batch 4, 64x64 | fp32 | {out_error:.1e} | "
                f"(worst parameter gradient) {worst_grad:.1e} | | | {'yes' if ok else 'NO'} |"
            )
            passed &= ok
        except Exception as error:  # noqa: BLE001
            passed = False
            print(
                f"| KW-ResNet18 1x | fp32 | failed: {type(error).__name__}: {str(error)[:200]} | | | | NO |"
            )
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    print(f"\ncorrectness: {'all cases pass' if passed else 'SOME CASES FAIL'}\n", flush=True)
    return passed


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn: Callable[[], Any]) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def train_step(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, amp: torch.dtype | None
) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=amp) if amp else contextlib.nullcontext():
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()

    return step


def inference(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    return run


def with_path(path: str | None, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` run along execution path ``path`` (None: a static model)."""

    def run() -> None:
        with kw.execution_path(path) if path else contextlib.nullcontext():
            fn()

    return run


def compare(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float | str]:
    """Median seconds of each function, timed interleaved after one warm-up; a function that fails
    gives its error instead (the others go on)."""
    times: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    for name, fn in fns.items():
        try:
            fn()
            times[name] = []
        except Exception as error:  # noqa: BLE001
            errors[name] = failure(error)
    for _ in range(repeats):
        for name in list(times):
            try:
                times[name].append(timed(fns[name]))
            except Exception as error:  # noqa: BLE001
                errors[name] = failure(error)
                del times[name]
    return {**{name: statistics.median(t) for name, t in times.items()}, **errors}


def failure(error: Exception) -> str:
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"


def memory(fn: Callable[[], None]) -> float | str:
    try:
        fn()  # gradients and optimizer state exist before measuring
        return peak_memory(fn, DEVICE) / 2**20
    except Exception as error:  # noqa: BLE001
        return failure(error)


def cell(value: float | str, static: float | str, unit: str, batch: int, is_static: bool) -> str:
    """A table cell: the figure, and for a KW model its time (or memory) over the static model's."""
    if isinstance(value, str):
        return value
    if unit == "img/s":
        shown = f"{batch / value:.0f} img/s"
    elif unit == "ms":
        shown = f"{value * 1e3:.1f} ms"
    else:
        shown = f"{value:.0f} MiB"
    if isinstance(static, str) or is_static:
        return shown
    return f"{shown} ({value / static:.2f}x)"


def bench_model(
    name: str, batch: int, paths: list[str], repeats: int, channels_last: bool, image_size: int
) -> None:
    torch.manual_seed(0)
    static = static_counterpart(name)[0].to(DEVICE)
    kw_model = kw.create_model(name, budget=1).to(DEVICE)
    set_temperature(kw_model, 0.5)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    static, kw_model = static.to(memory_format=layout), kw_model.to(memory_format=layout)
    x = torch.randn(batch, 3, image_size, image_size, device=DEVICE).to(memory_format=layout)
    target = torch.randint(0, 1000, (batch,), device=DEVICE)
    columns = ["static", *paths]
    models = {"static": static, **{p: kw_model for p in paths}}
    figures: dict[str, tuple[str, dict[str, float | str]]] = {}
    layer_paths: dict[str, dict[str, dict[str, str | None]]] = {p: {} for p in paths}

    def per_path(
        make: Callable[[nn.Module], Callable[[], None]], figure: str
    ) -> dict[str, Callable[[], None]]:
        fns = {}
        for column in columns:
            path = None if column == "static" else column
            fn = with_path(path, make(models[column]))
            if path:

                def recorded(fn=fn, path=path) -> None:
                    fn()
                    layer_paths[path][figure] = chosen_paths(kw_model)

                fns[column] = recorded
            else:
                fns[column] = fn
        return fns

    for figure, unit, make in (
        ("training fp32", "img/s", lambda m: train_step(m, x, target, None)),
        ("training bf16", "img/s", lambda m: train_step(m, x, target, torch.bfloat16)),
        ("inference fp32", "ms", lambda m: inference(m, x)),
    ):
        figures[figure] = (unit, compare(per_path(make, figure), repeats))
        print(f"  done: {figure}", file=sys.stderr, flush=True)
    for amp, label in ((None, "fp32"), (torch.bfloat16, "bf16")):
        fns = per_path(lambda m: train_step(m, x, target, amp), f"peak memory {label}")
        figures[f"peak training memory {label}"] = ("MiB", {c: memory(fn) for c, fn in fns.items()})

    print(
        f"\n### {name} 1x against {static_counterpart(name)[1]}, batch {batch}, {image_size}x{image_size}"
        f"{', channels-last' if channels_last else ''}\n"
    )
    print("Ratios: the KW model's step time, latency or memory over the static model's.\n")
    print("| figure | " + " | ".join(f"KW {c}" if c != "static" else c for c in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for figure, (unit, values) in figures.items():
        static_value = values.get("static", "n/a")
        row = " | ".join(
            cell(values.get(c, "not run"), static_value, unit, batch, c == "static") for c in columns
        )
        print(f"| {figure} | {row} |")
    if "reference" in paths:
        ref = figures["training fp32"][1].get("reference"), figures["training bf16"][1].get("reference")
        for path in paths:
            if path == "reference":
                continue
            ours = figures["training fp32"][1].get(path), figures["training bf16"][1].get(path)
            faster = [
                f"{r / o:.2f}x" if isinstance(r, float) and isinstance(o, float) else "n/a"
                for r, o in zip(ref, ours)
            ]
            print(
                f"\n{path} against the reference scheme, training step: {faster[0]} faster in fp32, "
                f"{faster[1]} in bf16"
            )
    for path, by_figure in layer_paths.items():
        if not by_figure:
            continue
        print(f"\npaths each layer ran with {path!r}:")
        layers = next(iter(by_figure.values()))
        summary = {figure: Counter(str(v) for v in chosen.values()) for figure, chosen in by_figure.items()}
        for figure, counts in summary.items():
            print(f"  {figure}: " + ", ".join(f"{p} x{n}" for p, n in counts.most_common()))
        others = [
            layer
            for layer in layers
            if any(str(by_figure[f].get(layer)).split(":")[0] != path for f in by_figure)
        ]
        if others and path != "auto":
            print(f"  layers that did not take {path}:")
        for layer in layers if path == "auto" else others:
            chosen = {str(by_figure[f].get(layer)) for f in by_figure}
            shown = (
                chosen.pop()
                if len(chosen) == 1
                else ", ".join(f"{f} {by_figure[f].get(layer)}" for f in by_figure)
            )
            print(f"  {layer}: {shown}")


def machine() -> str:
    when = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"
    if DEVICE.type != "cuda":
        return f"{kw.native.cpu_model()} (dry run on CPU), torch {torch.__version__}, {when}"
    props = torch.cuda.get_device_properties(DEVICE)
    import triton

    return (
        f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, triton {triton.__version__}, {when}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="kw_resnet18,kw_resnet50")
    parser.add_argument("--batches", default="64,128")
    parser.add_argument(
        "--paths",
        default="triton,reference",
        help="comma-separated execution paths; 'auto' times every candidate per layer first",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--channels-last", action="store_true", help="models and inputs in channels-last layout"
    )
    parser.add_argument("--skip-check", action="store_true", help="skip the correctness check")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--time-budget",
        type=float,
        default=280.0,
        help="seconds after which the remaining model rows are skipped (each named)",
    )
    parser.add_argument(
        "--device", default="cuda", help="'cpu' runs the table alone, as a dry run of this script"
    )
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py needs a CUDA GPU and none is visible here (torch.cuda.is_available() is "
            "False); nothing was measured."
        )
        return 0
    if DEVICE.type == "cuda":
        try:
            import triton  # noqa: F401
        except Exception as error:  # noqa: BLE001
            print(f"triton does not import here ({error!r}); the triton path cannot run.")
            return 1
    paths = args.paths.split(",")
    for path in paths:
        if path != "auto":
            kw.set_execution_path(path)  # checks the name before anything runs
    kw.set_execution_path("auto")
    print(f"# The triton path on {machine()}\n", flush=True)
    print("(the first call of each kernel variant compiles it: seconds each, in the untimed warm-ups)\n")
    begun = time.perf_counter()
    ok = True if args.skip_check or DEVICE.type != "cuda" else correctness()
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            started = time.perf_counter()
            if started - begun > args.time_budget:
                print(
                    f"\n### {name}, batch {batch}: skipped, past the time budget of "
                    f"{args.time_budget:.0f} s (--time-budget)"
                )
                continue
            try:
                bench_model(name, batch, paths, args.repeats, args.channels_last, args.image_size)
            except Exception:  # noqa: BLE001 - the next model and batch still run
                print(f"\n### {name}, batch {batch}: failed\n```\n{traceback.format_exc()[-3000:]}```")
                if DEVICE.type == "cuda":
                    torch.cuda.empty_cache()
            print(f"\n({name}, batch {batch}: {time.perf_counter() - started:.0f} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
