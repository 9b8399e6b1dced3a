"""The native CPU kernels compute what PyTorch's products compute, build once, and step aside where
they do not apply."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import kernelwarehouse as kw
import kernelwarehouse.native as native
from kernelwarehouse.core.assembly import mix_rows, rows_gradient
from kernelwarehouse.core.execution import execution_path

COMPILER = shutil.which("cc") or shutil.which("gcc")
needs_kernels = pytest.mark.skipif(not sys.platform.startswith("linux") or COMPILER is None,
                                   reason="native kernels are built on Linux with a C compiler")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A library looked up again under this test's environment, and again after it."""
    monkeypatch.setenv("KERNELWAREHOUSE_CACHE", str(tmp_path))
    native._library.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    native._library.cache_clear()


@needs_kernels
def test_kernels_build_once_into_the_cache(fresh_library):
    assert native.available()
    built = list(fresh_library.glob("kernels-*.so"))
    assert len(built) == 1 and not list(fresh_library.glob("*.partial"))
    stamp = built[0].stat().st_mtime_ns
    assert native._build(COMPILER) == built[0] and built[0].stat().st_mtime_ns == stamp


def test_failed_build_falls_back_with_a_warning(fresh_library, monkeypatch):
    monkeypatch.setenv("CC", "false")   # a compiler that always fails
    with pytest.warns(RuntimeWarning, match="native kernels unavailable"):
        assert not native.available()
    assert not list(fresh_library.iterdir())
    rows, cells = torch.randn(3, 4), torch.randn(5, 4, 6)
    assert torch.equal(mix_rows(rows, cells), torch.bmm(rows.expand(5, -1, -1), cells))


def test_switched_off_by_the_environment(fresh_library, monkeypatch):
    monkeypatch.setenv("KERNELWAREHOUSE_NATIVE", "0")
    assert not native.available() and not native.applies(torch.randn(2))


@needs_kernels
@pytest.mark.parametrize("rows,num,length", [(1, 1, 1), (9, 27, 512), (5, 7, 17), (13, 60, 100), (18, 47, 64),
                                             (2, 3, 530), (144, 56, 36)])
def test_mix_rows_matches_float64(rows, num, length):
    torch.manual_seed(rows * 1000 + length)
    a = torch.randn(rows, num)
    cells = torch.randn(num, 6, length).transpose(0, 1)   # (c, n, d) with the strides of a warehouse view
    want = torch.einsum("rj,cjd->crd", a.double(), cells.double())
    assert native.applies(a, cells)
    got = native.mix_rows(a, cells)
    assert got.shape == (6, rows, length) and relative(got, want) < 1e-6
    out = torch.randn(6, rows, length)
    start = out.clone()
    assert native.mix_rows(a, cells, out=out) is out and relative(out, want) < 1e-6
    out.copy_(start)
    native.mix_rows(a, cells, out=out, accumulate=True)
    assert relative(out, start.double() + want) < 1e-6


@needs_kernels
@pytest.mark.parametrize("length", [1, 63, 64, 1000, 4608])
def test_mix_rows_of_one_channel_is_shared_by_the_threads(length):
    """With fewer channels than threads, the threads take pieces of the length (a plain product)."""
    torch.manual_seed(length)
    a, cells = torch.randn(49, 128), torch.randn(1, 128, length)
    want = (a.double() @ cells[0].double()).unsqueeze(0)
    assert relative(native.mix_rows(a, cells), want) < 1e-6
    out = torch.ones(1, 49, length)
    assert relative(native.mix_rows(a, cells, out=out, accumulate=True), want + 1) < 1e-6


@needs_kernels
@pytest.mark.parametrize("rows,num,length", [(1, 1, 1), (9, 27, 512), (5, 7, 17), (4, 47, 130), (3, 60, 1)])
def test_rows_gradient_matches_float64_and_repeats_exactly(rows, num, length):
    torch.manual_seed(rows + num + length)
    grad = torch.randn(rows, 33, length).transpose(0, 1)   # (c, r, d), channels strided
    cells = torch.randn(33, num, length)
    want = torch.einsum("crd,cjd->rj", grad.double(), cells.double())
    got = native.rows_gradient(grad, cells)
    assert got.shape == (rows, num) and relative(got, want) < 1e-6
    assert torch.equal(native.rows_gradient(grad, cells), got)


@needs_kernels
def test_products_go_native_only_where_that_pays(monkeypatch):
    calls = []
    kernels = {name: getattr(native, name) for name in ("mix_rows", "rows_gradient")}
    for name, kernel in kernels.items():
        monkeypatch.setattr(native, name, lambda *a, _k=kernel, _n=name, **k: calls.append(_n) or _k(*a, **k))
    small, large = (torch.randn(9, 8), torch.randn(8, 8, 16)), (torch.randn(9, 27), torch.randn(64, 27, 512))
    for rows, cells in (small, large):
        want = torch.bmm(rows.expand(cells.shape[0], -1, -1), cells)
        assert relative(mix_rows(rows, cells), want) < 1e-6
        assert relative(rows_gradient(want, cells), torch.bmm(want, cells.transpose(1, 2)).sum(0)) < 1e-5
    assert calls == ["mix_rows", "rows_gradient"]   # the large pair only
    assert not native.worthwhile(native.MIN_MACS - 1, 512) and not native.worthwhile(10 ** 9, 8)
    assert native.worthwhile(native.MIN_MACS, 16)


@needs_kernels
def test_applies_only_where_it_computes_the_same():
    a, cells = torch.randn(3, 4), torch.randn(5, 4, 6)
    assert native.applies(a, cells)
    assert not native.applies(a.double(), cells.double())
    leaf = a.clone().requires_grad_()
    assert not native.applies(leaf, cells)
    with torch.no_grad():
        assert native.applies(leaf, cells)
    traced = torch.jit.trace(lambda r, c: mix_rows(r, c) * 1, (a, cells))
    assert "bmm" in str(traced.graph)   # recorded as a PyTorch product, not a foreign call
    assert torch.allclose(traced(a, cells), mix_rows(a, cells), rtol=1e-5, atol=1e-5)


PROBE = """
import torch
def runtimes():
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if any(n in line for n in ("libgomp", "libiomp", "libomp"))}
before = runtimes()
import kernelwarehouse.native as native
assert native.available()
native.mix_rows(torch.randn(3, 4), torch.randn(5, 4, 6))
print(len(before), len(runtimes() - before))
"""


@needs_kernels
def test_kernels_share_pytorchs_openmp_runtime(tmp_path):
    env = {**os.environ, "KERNELWAREHOUSE_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0"]   # torch's runtime, and no second one


@needs_kernels
@pytest.mark.parametrize("kwargs,shape", [
    (dict(in_channels=16, out_channels=64, kernel_size=3, padding=1, cell_num_ratio=2), (3, 16, 7, 7)),
    (dict(in_channels=16, out_channels=64, kernel_size=3, padding=1, cell_inplane_ratio=0.5,
          cell_outplane_ratio=0.5), (2, 16, 6, 6)),
    (dict(in_channels=16, out_channels=32, kernel_size=3, padding=1, spatial_partition=False), (2, 16, 6, 6)),
    (dict(in_channels=16, out_channels=32, kernel_size=3, padding=1, groups=2), (2, 16, 6, 6)),
])
@pytest.mark.parametrize("slices", [False, True])
@pytest.mark.parametrize("backward_by_slices", [False, True])
def test_loop_path_float32_training_equals_pytorch_products(monkeypatch, kwargs, shape, slices, backward_by_slices):
    import kernelwarehouse.core.execution as execution
    import kernelwarehouse.core.loop as loop
    torch.manual_seed(7)
    layer = kw.KWConv2d(**kwargs, norm="layer").train()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x = torch.randn(shape)
    monkeypatch.setattr(execution, "mix_is_cheap", lambda *args: False)   # the per-sample backward
    if slices:
        monkeypatch.setattr(loop, "LOOP_SLICE_ELEMENTS", 1)
    monkeypatch.setattr(loop, "SLICED_MAX_POSITIONS", 10 ** 6 if backward_by_slices else 0)
    monkeypatch.setattr(native, "MIN_MACS", 0)   # small layers: every product native
    monkeypatch.setattr(native, "MIN_LENGTH", 0)

    def step(use_native: bool) -> list[torch.Tensor]:
        layer.zero_grad()
        inputs = x.clone().requires_grad_()
        with monkeypatch.context() as patch, execution_path("loop"):
            if not use_native:
                patch.setattr(native, "applies", lambda *tensors: False)
            out = layer(inputs)
            out.square().mean().backward()
        return [out.detach(), inputs.grad, *(p.grad for p in layer.parameters())]

    calls = []

    def spy(kernel):
        def counted(*args, **kwargs):
            calls.append(kernel.__name__)
            return kernel(*args, **kwargs)
        return counted

    with monkeypatch.context() as patch:
        patch.setattr(native, "mix_rows", spy(native.mix_rows))
        patch.setattr(native, "rows_gradient", spy(native.rows_gradient))
        got = step(True)
    assert {"mix_rows", "rows_gradient"} <= set(calls), "the native kernels were not used"
    want = step(False)
    for g, w in zip(got, want):
        assert relative(g, w) < 1e-5
