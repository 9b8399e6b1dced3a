"""Latency and memory of a KernelWarehouse model against its static counterpart, in one process.

Absolute timings depend on the machine and its load; the ratios to the static model, measured
interleaved in the same run (medians of repeats), are what carry over.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from .. import native
from ..core.build import chosen_paths
from ..core.choice import get_path_choice
from ..core.execution import execution_path
from ..core.paths import check_choice
from ..core.temperature import set_temperature
from ..models.registry import create_model, format_budget, model_entry, parse_budget
from .macs import count_macs

TORCHVISION = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "mobilenetv2_100": "mobilenet_v2",
    "convnext_tiny": "convnext_tiny",
}


def static_counterpart(name: str, num_classes: int = 1000) -> tuple[nn.Module, str]:
    """The static model a dynamic model (``kw_resnet18``, ``odconv_resnet18``) is compared with:
    torchvision's where it has one, else ours."""
    static = name.split("_", 1)[1]
    try:
        import torchvision

        return getattr(torchvision.models, TORCHVISION[static])(
            num_classes=num_classes
        ), f"torchvision {TORCHVISION[static]}"
    except (ImportError, KeyError):
        return create_model(static, num_classes=num_classes), static


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of tensors allocated while ``fn`` runs, above what was allocated before it."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # each op's own allocations net of its frees, and bare free/alloc records, in time order: the
    # running sum's maximum is the peak (to within what one op holds only while it runs)
    records = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in prof.events()
    )
    live = peak = 0
    for _, delta in records:
        live += delta
        peak = max(peak, live)
    return peak


def _train_step(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, amp: torch.dtype | None
) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    autocast = (lambda: torch.autocast(x.device.type, dtype=amp)) if amp else contextlib.nullcontext

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()

    return step


def benchmark(
    model: str = "kw_resnet18",
    budget: Any = 1,
    batch_size: int = 16,
    image_size: int = 224,
    device: str = "cpu",
    threads: int | None = None,
    repeats: int = 5,
    memory_batch_size: int | None = 32,
    tau: float = 0.5,
    path: str = "auto",
    amp: str | None = None,
    seed: int = 0,
    native_kernels: bool = True,
) -> dict[str, Any]:
    """Params, MACs, inference latency (``batch_size`` and 1), training-step latency and peak training
    memory (``memory_batch_size``) of ``model`` at ``budget``, each beside the static counterpart's.
    ``native_kernels=False`` times PyTorch's products in place of :mod:`kernelwarehouse.native`.
    The result also names the native kernels' variant and, per figure, the path each layer ran
    (``paths``: {figure: {layer: path}}); with ``path="auto"`` the first call of each layer
    geometry is measured (:mod:`kernelwarehouse.core.choice`) in the untimed warm-up."""
    if batch_size < 1 or repeats < 1 or image_size < 32:
        raise ValueError(
            f"batch_size and repeats must be >= 1 and image_size >= 32, got "
            f"{batch_size}, {repeats}, {image_size}"
        )
    if amp not in (None, "bf16", "fp16"):
        raise ValueError(f"amp must be 'bf16', 'fp16' or None, got {amp!r}")
    if path != "auto":
        check_choice(path)  # before any model is built
    entry = model_entry(model)
    if entry.kind == "static":
        raise ValueError(
            f"{model!r} is a static model; benchmark a KernelWarehouse model (kw_*) or a baseline"
        )
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if entry.kind == "baseline":  # CondConv / DY-Conv / ODConv: K kernels, no budget
        kw_model, variant = create_model(model).to(dev), "K=4"
    else:
        budget = parse_budget(budget)
        kw_model, variant = create_model(model, budget=budget).to(dev), format_budget(budget)
    set_temperature(kw_model, tau)
    static, static_name = static_counterpart(model)
    static = static.to(dev)
    shape = (3, image_size, image_size)
    result: dict[str, Any] = {
        "model": model,
        "budget": variant,
        "static": static_name,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "image_size": image_size,
        "batch_size": batch_size,
        "tau": tau,
        "path": path,
        "path_choice": get_path_choice(),
        "amp": amp,
        "native_kernels": native_kernels and dev.type == "cpu" and native.available(),
        "native_variant": native.variant() if native_kernels and dev.type == "cpu" else None,
        "figures": {},
        "paths": {},
    }
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")
    figures = result["figures"]

    def add(name: str, unit: str, ours: float, theirs: float) -> None:
        figures[name] = {"unit": unit, "kw": ours, "static": theirs, "ratio": ours / theirs}

    add(
        "params",
        "M",
        sum(p.numel() for p in kw_model.parameters()) / 1e6,
        sum(p.numel() for p in static.parameters()) / 1e6,
    )
    with native.enabled(native_kernels):
        add("macs", "G", count_macs(kw_model, shape).total / 1e9, count_macs(static, shape).total / 1e9)

    def compare(name: str, make: Callable[[nn.Module], Callable[[], Any]]) -> None:
        fns = [make(kw_model), make(static)]
        for fn in fns:  # warm-up
            fn()
        times: list[list[float]] = [[], []]
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                times[i].append(_timed(fn, dev))
        add(name, "ms", statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3)
        result["paths"][name] = chosen_paths(kw_model)

    def inference(batch: int) -> Callable[[nn.Module], Callable[[], Any]]:
        x = torch.randn(batch, *shape, device=dev)

        def make(m: nn.Module) -> Callable[[], Any]:
            def run() -> None:
                m.eval()
                with (
                    torch.no_grad(),
                    torch.autocast(dev.type, dtype=dtype) if dtype else contextlib.nullcontext(),
                ):
                    m(x)

            return run

        return make

    def training(batch: int) -> Callable[[nn.Module], Callable[[], Any]]:
        x = torch.randn(batch, *shape, device=dev)
        target = torch.randint(0, 1000, (batch,), device=dev)

        def make(m: nn.Module) -> Callable[[], Any]:
            step = _train_step(m, x, target, dtype)

            def run() -> None:
                m.train()
                step()

            return run

        return make

    with execution_path(path), native.enabled(native_kernels):
        # a step of each first: the allocator then holds the large blocks a running job reuses
        # (before that, fresh ones cost page faults, more for whichever model runs first)
        for m in (kw_model, static):
            training(batch_size)(m)()
        compare(f"inference b{batch_size}", inference(batch_size))
        if batch_size != 1:
            compare("inference b1", inference(1))
        compare(f"train step b{batch_size}", training(batch_size))
        if memory_batch_size:
            peaks = []
            for m in (kw_model, static):
                step = training(memory_batch_size)(m)
                step()  # gradients and optimizer state exist before measuring
                peaks.append(peak_memory(step, dev) / 2**20)
            add(f"peak train memory b{memory_batch_size}", "MiB", *peaks)
            result["paths"][f"peak train memory b{memory_batch_size}"] = chosen_paths(kw_model)
    return result


def format_paths(result: dict[str, Any]) -> str:
    """A markdown table of the path each layer ran, one column per figure of a :func:`benchmark`."""
    figures = [f for f in result["paths"] if result["paths"][f]]
    if not figures:
        return ""
    lines = ["| layer | " + " | ".join(figures) + " |", "|---|" + "---|" * len(figures)]
    for layer in result["paths"][figures[0]]:
        lines.append(f"| {layer} | " + " | ".join(str(result["paths"][f].get(layer)) for f in figures) + " |")
    return "\n".join(lines)


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of a :func:`benchmark` result."""
    lines = [
        f"| figure | {result['model']} {result['budget']} | {result['static']} | ratio |",
        "|---|---:|---:|---:|",
    ]
    for name, fig in result["figures"].items():
        digits = 3 if fig["unit"] in ("G", "M") else 1
        lines.append(
            f"| {name} ({fig['unit']}) | {fig['kw']:.{digits}f} | {fig['static']:.{digits}f} | "
            f"{fig['ratio']:.2f}x |"
        )
    return "\n".join(lines)
