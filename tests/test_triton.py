"""The ``triton`` path: its place in the registry (here, on CPU) and its kernels against the
``reference`` path, run by Triton's interpreter on CPU tensors; and (slow) the kernels compiled
for CUDA, which needs no GPU either.

The interpreter must be switched on (``TRITON_INTERPRET=1``) before Triton is first imported, and
other tests of a worker may have imported it already; so the kernels run in one subprocess, this
file run as a script, which prints every case's relative errors as JSON.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import kernelwarehouse as kw
import kernelwarehouse.core.paths as paths
from kernelwarehouse.core.execution import execution_path
from kernelwarehouse.core.paths import LayerCall, candidates, fall_back, rule_choice

# name: (layer class, constructor kwargs, input shape, input layout, dtype); batches of 1 and 3
C, F32 = "contiguous", "float32"
CASES = {
    "conv3x3_padded": (
        kw.KWConv2d,
        dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, cell_num_ratio=2),
        (3, 8, 5, 5),
        C,
        F32,
    ),
    "conv3x3_strided_dilated": (
        kw.KWConv2d,
        dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=2, dilation=2),
        (3, 8, 9, 8),
        C,
        F32,
    ),
    "conv3x3_cell_blocks": (
        kw.KWConv2d,
        dict(
            in_channels=8,
            out_channels=16,
            kernel_size=3,
            padding=1,
            cell_inplane_ratio=0.5,
            cell_outplane_ratio=0.5,
            cell_num_ratio=0.5,
        ),
        (2, 8, 5, 5),
        C,
        F32,
    ),
    "conv3x3_whole_kernel_cells_batch1": (
        kw.KWConv2d,
        dict(
            in_channels=8, out_channels=8, kernel_size=3, padding=1, spatial_partition=False, cell_num_ratio=4
        ),
        (1, 8, 6, 6),
        C,
        F32,
    ),
    "conv3x3_groups": (
        kw.KWConv2d,
        dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, groups=4),
        (2, 8, 5, 5),
        C,
        F32,
    ),
    "conv3x3_tiles_in_one_cell": (
        kw.KWConv2d,
        dict(in_channels=32, out_channels=32, kernel_size=3, padding=1),
        (3, 32, 5, 5),
        C,
        F32,
    ),
    "conv3x3_groups_tiles_in_one_cell": (
        kw.KWConv2d,
        dict(in_channels=32, out_channels=64, kernel_size=3, stride=2, padding=1, groups=2),
        (1, 32, 6, 6),
        C,
        F32,
    ),
    "conv3x2_asymmetric_batch1": (
        kw.KWConv2d,
        dict(in_channels=8, out_channels=8, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
        (1, 8, 9, 7),
        C,
        F32,
    ),
    "conv1x1_strided": (
        kw.KWConv2d,
        dict(in_channels=8, out_channels=16, kernel_size=1, stride=2),
        (3, 8, 7, 7),
        C,
        F32,
    ),
    "conv3x3_groups_channels_last": (
        kw.KWConv2d,
        dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=2),
        (2, 8, 5, 4),
        "channels_last",
        F32,
    ),
    "conv1d": (
        kw.KWConv1d,
        dict(in_channels=6, out_channels=10, kernel_size=5, stride=2, padding=2),
        (3, 6, 17),
        C,
        F32,
    ),
    "linear_tokens": (
        kw.KWLinear,
        dict(in_features=12, out_features=20, cell_inplane_ratio=0.5),
        (3, 5, 12),
        C,
        F32,
    ),
    "linear_batch1": (kw.KWLinear, dict(in_features=16, out_features=10), (1, 4, 16), C, F32),
    "conv3x3_float16": (
        kw.KWConv2d,
        dict(in_channels=8, out_channels=12, kernel_size=3, padding=1),
        (2, 8, 5, 5),
        C,
        "float16",
    ),
}
TOLERANCE = {"float32": 1e-5, "float16": 5e-3}
OUTPUTS = ("output", "input grad", "mixture grad", "cells grad")


def run_case(name: str) -> list[float]:
    """Relative errors (max |difference| / max |reference|) of the ``triton`` path's output and
    gradients against the ``reference`` path's, the reference computed in fp32."""
    cls, kwargs, shape, layout, dtype = CASES[name]
    layer = cls(**kwargs)
    x = torch.randn(*shape)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    mixture = torch.randn(shape[0], layer.plan.num_cells, layer.warehouse.num_cells)
    geo, cells = layer._geometry, layer.warehouse.weight.detach()
    results = []
    for path, cast in (("triton", getattr(torch, dtype)), ("reference", torch.float32)):
        inputs = [
            t.to(cast).requires_grad_() if i == 0 else t.clone().requires_grad_()
            for i, t in enumerate((x, mixture, cells))
        ]
        out = paths.REGISTRY[path].forward(*inputs, geo, "", True)
        grad = torch.cos(torch.arange(out.numel(), dtype=torch.float32)).reshape(out.shape)
        grads = torch.autograd.grad(out, inputs, grad.to(out.dtype))
        results.append([out.float(), *(g.float() for g in grads)])
    (ours, reference), wanted_layout = results, torch.channels_last if layout == "channels_last" else None
    if wanted_layout is not None and not ours[0].is_contiguous(memory_format=wanted_layout):
        return [float("inf")] * len(OUTPUTS)  # a channels-last input gives a channels-last output
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, reference)]


def compile_report() -> dict[str, int]:
    """Every kernel compiled for CUDA (sm_80, sm_90) by Triton's own compiler and ptxas, which need no
    GPU, with the tile sizes of :mod:`kernelwarehouse.tuning`: {kernel: bytes of stack per thread},
    where a stack means registers spilled to memory."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernelwarehouse import tuning
    from kernelwarehouse.core import triton_conv as kernels

    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tile = kernels._Tile(
        tuning.TRITON_BLOCK_POSITIONS, tuning.TRITON_BLOCK_CHANNELS, tuning.TRITON_BLOCK_REDUCTION
    )
    weight_tile = kernels._Tile(
        tuning.TRITON_BLOCK_CHANNELS, tuning.TRITON_BLOCK_CHANNELS, tuning.TRITON_BLOCK_REDUCTION
    )
    # the kernels' tuple arguments, integers throughout
    ints = {
        name: kind(*["i32"] * len(kind._fields))
        for name, kind in (("cells", kernels._Cells), ("conv", kernels._Conv))
    }
    ints.update({f"{name}_strides": kernels._Strides(*["i32"] * 4) for name in ("x", "out", "grad")})
    stacks = {}
    for arch in (80, 90):
        for dtype, precision in (("fp32", "tf32"), ("bf16", "ieee")):
            types = {name: f"*{dtype}" for name in ("x_ptr", "out_ptr", "grad_ptr", "gx_ptr")}
            types.update(mix_ptr="*fp32", cells_ptr="*fp32", gw_ptr="*fp32", **ints)
            assembling = (kernels._forward_kernel, kernels._input_grad_kernel)
            jobs = [
                (kernel, dict(TILE=tile, ONE_CELL=one_cell), f"{kernel.__name__} one_cell={one_cell}")
                for kernel in assembling
                for one_cell in (True, False)
            ]
            jobs.append((kernels._weight_grad_kernel, dict(TILE=weight_tile), "_weight_grad_kernel"))
            for kernel, constants, name in jobs:
                constants.update(KERNEL=(3, 3), PRECISION=precision)
                signature = {
                    arg: "constexpr" if arg in constants else types.get(arg, "i32")
                    for arg in kernel.arg_names
                }
                compiled = triton.compile(
                    ASTSource(kernel, signature, constants),
                    target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": tuning.TRITON_WARPS},
                )
                cubin = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"kw-triton-{os.getpid()}.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                usage = subprocess.run(
                    [str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True
                )
                cubin.unlink()
                stacks[f"sm_{arch} {dtype} {name}"] = int(re.search(r"STACK:(\d+)", usage.stdout).group(1))
    return stacks


def main() -> None:
    try:
        import triton.language  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any failure means: no interpreter here
        print(json.dumps({"unavailable": f"triton does not import: {error!r}"}))
        return
    if sys.argv[1:] == ["compile"]:
        try:
            print(json.dumps({"stacks": compile_report()}))
        except Exception as error:  # noqa: BLE001 - no CUDA compiler in this Triton
            print(json.dumps({"unavailable": f"cannot compile for CUDA here: {error!r}"}))
        return
    torch.backends.cudnn.allow_tf32 = False  # exact fp32 products
    errors = {}
    for name in CASES:
        torch.manual_seed(0)
        errors[name] = run_case(name)
    print(json.dumps({"errors": errors}))


def _run_script(*args: str, interpret: bool) -> dict:
    """This file run as a script in a fresh process (Triton not yet imported there)."""
    package_root = pathlib.Path(kw.__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        pytest.fail(f"the kernels failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "unavailable" in result:
        pytest.skip(result["unavailable"])
    return result


@pytest.fixture(scope="module")
def interpreted() -> dict[str, list[float]]:
    return _run_script(interpret=True)["errors"]


@pytest.mark.parametrize("name", CASES)
def test_kernels_match_reference(interpreted: dict[str, list[float]], name: str) -> None:
    tolerance = TOLERANCE[CASES[name][4]]
    for what, error in zip(OUTPUTS, interpreted[name]):
        assert error < tolerance, f"{name}: {what} differs from the reference by {error:.2e} (relative)"


@pytest.mark.slow
def test_kernels_compile_for_cuda_without_spills() -> None:
    stacks = _run_script("compile", interpret=False)["stacks"]
    assert len(stacks) == 20
    spilled = {kernel: size for kernel, size in stacks.items() if size}
    assert not spilled, f"with the tiles of kernelwarehouse.tuning these kernels spill registers: {spilled}"


# -- the registry, on CPU (Triton is not imported) -----------------------------------------------


def _call(
    layer: torch.nn.Module, shape: tuple[int, ...], device: str = "cuda:0", grad: bool = True
) -> LayerCall:
    x = torch.randn(*shape)
    mixture = torch.randn(shape[0], layer.plan.num_cells, layer.warehouse.num_cells)
    call = LayerCall.of(x, mixture, layer.warehouse.weight, layer._geometry)
    return call._replace(device=device, grad=grad)


def test_registered_for_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "triton_available", lambda: True)
    conv = kw.KWConv2d(16, 16, 3, padding=1)
    cuda = _call(conv, (4, 16, 8, 8))
    assert paths.REGISTRY["triton"].supports(cuda)
    assert "triton" in candidates(cuda) and "triton" in candidates(cuda._replace(grad=False))
    assert rule_choice(cuda) != "triton"  # the rule keeps its choice on a GPU: triton is taken after timing
    cpu = cuda._replace(device="cpu:1t:pytorch")
    assert "triton" not in candidates(cpu) and fall_back("triton", cpu) == "grouped"
    assert not paths.REGISTRY["triton"].supports(cuda._replace(graph=True))
    monkeypatch.setattr(paths, "triton_available", lambda: False)
    assert "triton" not in candidates(cuda) and fall_back("triton", cuda) == "grouped"


@pytest.mark.parametrize(
    "layer, shape",
    [
        (kw.KWConv2d(8, 8, 3, padding=1, groups=8), (2, 8, 6, 6)),  # depthwise: the other paths serve it
        (kw.KWConv3d(4, 6, 3, padding=1), (2, 4, 5, 5, 4)),  # 3-d
    ],
    ids=["depthwise", "conv3d"],
)
def test_unsupported_geometries(
    monkeypatch: pytest.MonkeyPatch, layer: torch.nn.Module, shape: tuple[int, ...]
) -> None:
    monkeypatch.setattr(paths, "triton_available", lambda: True)
    call = _call(layer, shape)
    assert not paths.REGISTRY["triton"].supports(call)
    assert "triton" not in candidates(call) and fall_back("triton", call) == "grouped"


def test_cpu_layer_falls_back_without_importing_triton_module() -> None:
    layer = kw.KWConv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 6, 6)
    with execution_path("triton"):
        out = layer(x)
    assert layer.last_path == "grouped"
    with execution_path("reference"):
        torch.testing.assert_close(out, layer(x))
    assert "kernelwarehouse.core.triton_conv" not in sys.modules


def test_package_import_leaves_triton_module_alone() -> None:
    code = "import sys, kernelwarehouse; print('kernelwarehouse.core.triton_conv' in sys.modules)"
    package_root = pathlib.Path(kw.__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


if __name__ == "__main__":
    main()
