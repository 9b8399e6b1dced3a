"""The native CPU kernels compute what PyTorch's products compute, build once, and step aside where
they do not apply."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from typing import Iterator

import pytest
import torch

import kernelwarehouse as kw
from kernelwarehouse import tuning
import kernelwarehouse.native as native
from kernelwarehouse.core.assembly import mix_rows, rows_gradient
from kernelwarehouse.core.execution import execution_path

COMPILER = shutil.which("cc") or shutil.which("gcc")
needs_kernels = pytest.mark.skipif(
    not sys.platform.startswith("linux") or COMPILER is None,
    reason="native kernels are built on Linux with a C compiler",
)


SUPPORTED = native.supported_variants()
# every variant this CPU runs (on an AVX-512 CPU all three), each test once per variant
each_variant = pytest.mark.parametrize(
    "variant",
    [
        pytest.param(
            name, marks=pytest.mark.skipif(name not in SUPPORTED, reason=f"this CPU cannot run {name}")
        )
        for name in native.VARIANTS
    ],
)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def error_of_sums(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor) -> float:
    """The largest error of sums against the sum of their terms' magnitudes (float32 sums of many terms
    that cancel are exact to that, not to their own size)."""
    return ((got.double() - want).abs() / magnitude.clamp_min(1e-30)).max().item()


@contextlib.contextmanager
def num_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(params=[1, 3], ids=lambda count: f"{count}threads")
def threads(request):
    """1 thread, and 3: the kernels split their work by torch's thread count."""
    with num_threads(request.param):
        yield request.param


@pytest.fixture
def kernels(variant) -> native.Kernels:
    loaded = native.load(variant)
    assert loaded is not None and loaded.variant == variant
    return loaded


@pytest.fixture
def relook(monkeypatch):
    """The process's library looked up again under this test's environment, and again after it."""
    monkeypatch.delenv("KERNELWAREHOUSE_ISA", raising=False)
    native._library.cache_clear()
    yield
    monkeypatch.undo()
    native._library.cache_clear()


@pytest.fixture
def fresh_library(monkeypatch, tmp_path, relook):
    """The same, building into an empty cache."""
    monkeypatch.setenv("KERNELWAREHOUSE_CACHE", str(tmp_path))
    return tmp_path


@needs_kernels
def test_kernels_build_once_into_the_cache(fresh_library):
    assert native.available() and native.variant() == SUPPORTED[0]
    built = list(fresh_library.glob("kernels-*.so"))
    assert len(built) == 1 and not list(fresh_library.glob("*.partial"))
    stamp = built[0].stat().st_mtime_ns
    assert native._build(COMPILER, native.variant()) == built[0] and built[0].stat().st_mtime_ns == stamp
    assert all(native.load(name).variant == name for name in SUPPORTED)  # one library per variant
    assert sorted(path.name.split("-")[1] for path in fresh_library.glob("kernels-*.so")) == sorted(SUPPORTED)
    assert native.load(SUPPORTED[0]) is native._library()


@pytest.mark.parametrize(
    "flags,machine,best",
    [
        ("fpu sse2 avx avx2 fma bmi2 avx512f avx512dq avx512cd avx512bw avx512vl", "x86_64", "avx512"),
        ("fpu sse2 avx avx2 fma avx512f avx512cd avx512er avx512pf", "x86_64", "avx2"),  # no avx512vl
        ("fpu sse2 avx avx2 fma", "x86_64", "avx2"),
        ("fpu sse2 avx avx2 bmi2", "x86_64", "portable"),  # no fma
        ("fpu sse2 avx fma", "x86_64", "portable"),  # no avx2
        ("", "x86_64", "portable"),
        ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp", "aarch64", "portable"),
        ("avx2 fma avx512f avx512vl", "arm64", "portable"),  # x86 flags count on x86 machines only
    ],
)
def test_variant_from_the_cpus_flags(flags, machine, best):
    assert native._select_variant(flags, machine) == best
    supported = native._supported(flags, machine)
    assert supported[0] == best and supported[-1] == "portable"
    assert supported == tuple(name for name in native.VARIANTS if name in supported)  # best first


def test_supported_variants_of_this_cpu():
    assert SUPPORTED[-1] == "portable" and set(SUPPORTED) <= set(native.VARIANTS)
    assert native.VARIANTS == ("avx512", "avx2", "portable")


@needs_kernels
@each_variant
def test_variant_chosen_by_the_environment(relook, monkeypatch, variant):
    monkeypatch.setenv("KERNELWAREHOUSE_ISA", variant)
    assert native.variant() == variant and native.available()
    a, cells = torch.randn(9, 27), torch.randn(4, 27, 40)
    assert relative(native.mix_rows(a, cells), torch.einsum("rj,cjd->crd", a.double(), cells.double())) < 1e-6


@needs_kernels
def test_a_variant_the_cpu_cannot_run_falls_back_with_a_warning(fresh_library, monkeypatch):
    monkeypatch.setattr(native, "cpu_features", lambda: "fpu sse sse2")  # a CPU without AVX
    monkeypatch.setenv("KERNELWAREHOUSE_ISA", "avx512")
    with pytest.warns(RuntimeWarning, match="KERNELWAREHOUSE_ISA=avx512, but this CPU cannot run it"):
        assert native.variant() == "portable"
    with pytest.raises(ValueError, match="cannot run the avx2 kernels"):
        native.load("avx2")


@needs_kernels
def test_unknown_variants_are_refused(relook, monkeypatch):
    monkeypatch.setenv("KERNELWAREHOUSE_ISA", "sse9")
    with pytest.raises(ValueError, match="unknown variant 'sse9', valid ones are avx512, avx2, portable"):
        native.available()
    with pytest.raises(ValueError, match="unknown variant 'neon', valid ones are avx512, avx2, portable"):
        native.load("neon")


@needs_kernels
@pytest.mark.skipif(len(SUPPORTED) < 2, reason="one variant only on this CPU")
def test_a_variant_that_fails_to_build_falls_back_to_the_next(fresh_library, monkeypatch):
    monkeypatch.setitem(native._ISA, SUPPORTED[0], (("-mno-such-option",),))
    with pytest.warns(
        RuntimeWarning, match=f"using the {SUPPORTED[1]} kernels, as the {SUPPORTED[0]} kernels failed"
    ):
        assert native.variant() == SUPPORTED[1]


def test_failed_build_falls_back_with_a_warning(fresh_library, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with pytest.warns(RuntimeWarning, match="native kernels unavailable"):
        assert not native.available() and native.variant() is None
    assert not list(fresh_library.iterdir())
    rows, cells = torch.randn(3, 4), torch.randn(5, 4, 6)
    assert torch.equal(mix_rows(rows, cells), torch.bmm(rows.expand(5, -1, -1), cells))


def test_switched_off_by_the_environment(fresh_library, monkeypatch):
    monkeypatch.setenv("KERNELWAREHOUSE_NATIVE", "0")
    assert not native.available() and not native.applies(torch.randn(2)) and native.variant() is None


@needs_kernels
def test_module_functions_run_the_process_variant():
    a, cells = torch.randn(9, 27), torch.randn(6, 27, 100)
    assert native.applies(a, cells) and native.variant() in SUPPORTED
    mine = native.load(native.variant())
    assert torch.equal(native.mix_rows(a, cells), mine.mix_rows(a, cells))
    grad = torch.randn(6, 9, 100)
    assert torch.equal(native.rows_gradient(grad, cells), mine.rows_gradient(grad, cells))


@needs_kernels
@each_variant
@pytest.mark.parametrize(
    "rows,num,length",
    [(1, 1, 1), (9, 27, 512), (5, 7, 17), (13, 60, 100), (18, 47, 64), (2, 3, 530), (144, 56, 36)],
)
def test_mix_rows_matches_float64(kernels, rows, num, length):
    torch.manual_seed(rows * 1000 + length)
    a = torch.randn(rows, num)
    cells = torch.randn(num, 6, length).transpose(0, 1)  # (c, n, d) with the strides of a warehouse view
    want = torch.einsum("rj,cjd->crd", a.double(), cells.double())
    got = kernels.mix_rows(a, cells)
    assert got.shape == (6, rows, length) and relative(got, want) < 1e-6
    out = torch.randn(6, rows, length)
    start = out.clone()
    assert kernels.mix_rows(a, cells, out=out) is out and relative(out, want) < 1e-6
    out.copy_(start)
    kernels.mix_rows(a, cells, out=out, accumulate=True)
    assert relative(out, start.double() + want) < 1e-6


# every tail of every variant's blocks: rows 1 to 13 (row blocks of 6: 9 rows are 4 + 5), lengths around
# multiples of 4, 8, 16, 32 and 64 floats (vectors and mix blocks of 4 x 16, 2 x 8, 2 x 4), and one element
TAIL_ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13)
TAIL_LENGTHS = (
    1,
    2,
    3,
    4,
    5,
    7,
    8,
    9,
    12,
    15,
    16,
    17,
    23,
    24,
    31,
    32,
    33,
    47,
    48,
    49,
    63,
    64,
    65,
    80,
    112,
    127,
    129,
)


@needs_kernels
@each_variant
@pytest.mark.parametrize("num", [1, 2, 27, 200])
def test_mix_rows_every_tail_of_the_blocks(kernels, num):
    torch.manual_seed(num)
    for rows in TAIL_ROWS:
        a = torch.randn(rows, num)
        for length in TAIL_LENGTHS:
            cells = torch.randn(3, num, length + 5)[:, :, 2:-3]  # rows of cells not aligned, strided
            want = torch.einsum("rj,cjd->crd", a.double(), cells.double())
            assert relative(kernels.mix_rows(a, cells), want) < 1e-6, (rows, length)
            out = torch.randn(3, rows, length + 1)[:, :, 1:]
            start = out.double()
            kernels.mix_rows(a, cells, out=out, accumulate=True)
            assert relative(out, start + want) < 1e-6, (rows, length)


@needs_kernels
@each_variant
@pytest.mark.parametrize("length", [1, 63, 64, 1000, 4608])
def test_mix_rows_of_one_channel_is_shared_by_the_threads(kernels, threads, length):
    """With fewer channels than threads, the threads take pieces of the length (a plain product)."""
    torch.manual_seed(length)
    a, cells = torch.randn(49, 128), torch.randn(1, 128, length)
    want = (a.double() @ cells[0].double()).unsqueeze(0)
    assert relative(kernels.mix_rows(a, cells), want) < 1e-6
    out = torch.ones(1, 49, length)
    assert relative(kernels.mix_rows(a, cells, out=out, accumulate=True), want + 1) < 1e-6


@needs_kernels
@each_variant
@pytest.mark.parametrize("rows,num,length", [(1, 1, 1), (9, 27, 512), (5, 7, 17), (4, 47, 130), (3, 60, 1)])
def test_rows_gradient_matches_float64_and_repeats_exactly(kernels, threads, rows, num, length):
    torch.manual_seed(rows + num + length)
    grad = torch.randn(rows, 33, length).transpose(0, 1)  # (c, r, d), channels strided
    cells = torch.randn(33, num, length)
    want = torch.einsum("crd,cjd->rj", grad.double(), cells.double())
    got = kernels.rows_gradient(grad, cells)
    assert got.shape == (rows, num) and relative(got, want) < 1e-6
    assert torch.equal(kernels.rows_gradient(grad, cells), got)


@needs_kernels
@each_variant
@pytest.mark.parametrize("num", [1, 2, 5, 27, 200])
def test_rows_gradient_every_tail_of_the_blocks(kernels, num):
    """Rows and cells around the gradient's blocks (3 x 3, 4 x 4), lengths around its vectors, and channels
    summed a few at a time (several such groups per thread, the last one short)."""
    torch.manual_seed(num)
    with num_threads(2):
        for rows in TAIL_ROWS:
            for length, channels in [
                (1, 3),
                (3, 5),
                (7, 2),
                (9, 3),
                (15, 4),
                (17, 3),
                (33, 2),
                (64, 3),
                (65, 2),
                (100, 3),
                (5, 997),
                (47, 301),
                (130, 97),
            ]:
                grad = torch.randn(channels, rows, length + 3)[:, :, 1:-2]
                cells = torch.randn(channels, num + 1, length)[:, 1:]
                want = torch.einsum("crd,cjd->rj", grad.double(), cells.double())
                magnitude = torch.einsum("crd,cjd->rj", grad.double().abs(), cells.double().abs())
                got = kernels.rows_gradient(grad, cells)
                assert error_of_sums(got, want, magnitude) < 1e-6, (rows, length, channels)
                assert torch.equal(kernels.rows_gradient(grad, cells), got)


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
    assert calls == ["mix_rows", "rows_gradient"]  # the large pair only
    assert not native.worthwhile(tuning.NATIVE_MIN_MACS - 1, 512) and not native.worthwhile(10**9, 8)
    assert native.worthwhile(tuning.NATIVE_MIN_MACS, 16)


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
    assert "bmm" in str(traced.graph)  # recorded as a PyTorch product, not a foreign call
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
    assert done.stdout.split() == ["1", "0"]  # torch's runtime, and no second one


@needs_kernels
@pytest.mark.parametrize(
    "kwargs,shape",
    [
        (dict(in_channels=16, out_channels=64, kernel_size=3, padding=1, cell_num_ratio=2), (3, 16, 7, 7)),
        (
            dict(
                in_channels=16,
                out_channels=64,
                kernel_size=3,
                padding=1,
                cell_inplane_ratio=0.5,
                cell_outplane_ratio=0.5,
            ),
            (2, 16, 6, 6),
        ),
        (
            dict(in_channels=16, out_channels=32, kernel_size=3, padding=1, spatial_partition=False),
            (2, 16, 6, 6),
        ),
        (dict(in_channels=16, out_channels=32, kernel_size=3, padding=1, groups=2), (2, 16, 6, 6)),
    ],
)
@pytest.mark.parametrize("slices", [False, True])
@pytest.mark.parametrize("backward_by_slices", [False, True])
def test_loop_path_float32_training_equals_pytorch_products(
    monkeypatch, kwargs, shape, slices, backward_by_slices
):
    torch.manual_seed(7)
    layer = kw.KWConv2d(**kwargs, norm="layer").train()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x = torch.randn(shape)
    if slices:
        monkeypatch.setattr(tuning, "LOOP_SLICE_ELEMENTS", 1)
    path = "loop:slices" if backward_by_slices else "loop:sample"  # the per-sample backward, or by slices
    monkeypatch.setattr(tuning, "NATIVE_MIN_MACS", 0)  # small layers: every product native
    monkeypatch.setattr(tuning, "NATIVE_MIN_LENGTH", 0)

    def step(use_native: bool) -> list[torch.Tensor]:
        layer.zero_grad()
        inputs = x.clone().requires_grad_()
        with monkeypatch.context() as patch, execution_path(path):
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


def fused_want(cols: torch.Tensor, rows: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """What the fused kernel computes, in float64: each sample's weight assembled whole, then applied."""
    batch, out_blocks, col_blocks, _ = rows.shape
    weights = torch.einsum("bocj,kjd->bokcd", rows.double(), cells.double())  # (B, ob, c_out, q, d)
    weights = weights.reshape(batch, out_blocks * cells.shape[0], -1)
    return torch.einsum("blk,bok->blo", cols.double(), weights)


@needs_kernels
@each_variant
@pytest.mark.parametrize(
    "batch,positions,out_blocks,col_blocks,num,c_out,length",
    [
        (1, 1, 1, 1, 1, 1, 1),  # one of everything
        (16, 49, 1, 9, 27, 512, 64),  # a ResNet's last stage, narrower
        (7, 13, 2, 3, 5, 80, 17),  # a batch of 6 + 1, channels past one block of 64, odd lengths
        (13, 6, 1, 2, 47, 136, 9),  # sample groups of 6, 6, 1 and three channel blocks, the last short
        (2, 100, 3, 1, 2, 24, 150),  # channels below one vector of AVX-512, columns in several slices
    ],
)
def test_fused_conv_matches_float64(
    kernels, threads, batch, positions, out_blocks, col_blocks, num, c_out, length
):
    torch.manual_seed(batch + positions + c_out)
    cols = torch.randn(batch, positions, col_blocks * length + 3)[:, :, 2:-1]  # rows strided
    rows = torch.randn(batch, out_blocks, col_blocks, num)
    cells = torch.randn(num, c_out, length).transpose(0, 1)  # (c_out, n, d), a warehouse's view
    want = fused_want(cols, rows, cells)
    magnitude = fused_want(cols.abs(), rows.abs(), cells.abs())
    contiguous_channels = (
        cells.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    )  # a transposed warehouse's view
    for view in (cells, contiguous_channels):
        for tile_floats in (1, 4096, 1 << 19):  # weight columns 8 at a time, a few dozen, all at once
            got = kernels.fused_conv(cols, rows, view, 64, tile_floats)
            assert got.shape == (batch, positions, out_blocks * c_out)
            assert error_of_sums(got, want, magnitude) < 1e-6, tile_floats


@needs_kernels
@each_variant
@pytest.mark.parametrize(
    "batch,positions,out_blocks,col_blocks,num,c_out,length",
    [
        (1, 1, 1, 1, 1, 1, 1),
        (16, 49, 1, 9, 27, 40, 64),  # a ResNet's last stage, narrower
        (7, 13, 2, 3, 5, 37, 17),  # odd channels and lengths, several blocks each way
        (3, 6, 1, 2, 13, 20, 150),  # columns in several slices
    ],
)
def test_fused_weight_grad_matches_float64_and_repeats_exactly(
    kernels, threads, batch, positions, out_blocks, col_blocks, num, c_out, length
):
    torch.manual_seed(batch + positions + c_out)
    cols = torch.randn(batch, positions, col_blocks * length + 3)[:, :, 2:-1]
    grad = torch.randn(batch, out_blocks * c_out, positions)
    rows = torch.randn(batch, out_blocks, col_blocks, num)
    cells = torch.randn(num, c_out, length).transpose(0, 1)  # (c_out, n, d), a warehouse's view
    weight_grads = torch.einsum("bol,blk->bok", grad.double(), cols.double())  # dW_b, (B, O, Q * d)
    weight_grads = weight_grads.reshape(batch, out_blocks, c_out, col_blocks, length)
    want_rows = torch.einsum("bocqd,cjd->boqj", weight_grads, cells.double())
    want_cells = torch.einsum("boqj,bocqd->cjd", rows.double(), weight_grads)
    magnitudes = torch.einsum("bol,blk->bok", grad.double().abs(), cols.double().abs())
    magnitudes = magnitudes.reshape(weight_grads.shape)
    for tile_floats in (1, 1 << 21):
        grad_rows, grad_cells = kernels.fused_weight_grad(cols, grad, rows, cells, 16, tile_floats)
        assert (
            error_of_sums(
                grad_rows, want_rows, torch.einsum("bocqd,cjd->boqj", magnitudes, cells.double().abs())
            )
            < 1e-6
        )
        assert (
            error_of_sums(
                grad_cells, want_cells, torch.einsum("boqj,bocqd->cjd", rows.double().abs(), magnitudes)
            )
            < 1e-6
        )
        again = kernels.fused_weight_grad(cols, grad, rows, cells, 16, tile_floats)
        assert torch.equal(again[0], grad_rows) and torch.equal(again[1], grad_cells)


@needs_kernels
def test_fused_conv_refuses_shapes_that_do_not_fit():
    kernels = native.load(native.variant())
    cells = torch.randn(8, 3, 5)  # (c_out, n, d)
    with pytest.raises(ValueError, match="do not fit"):  # two column blocks of 5 are 10 columns
        kernels.fused_conv(torch.randn(2, 4, 11), torch.randn(2, 1, 2, 3), cells, 64, 1 << 19)
    with pytest.raises(ValueError, match="do not fit"):  # 4 cells where the warehouse has 3
        kernels.fused_conv(torch.randn(2, 4, 10), torch.randn(2, 1, 2, 4), cells, 64, 1 << 19)
    with pytest.raises(ValueError, match="do not fit"):  # rows of another batch
        kernels.fused_conv(torch.randn(2, 4, 10), torch.randn(3, 1, 2, 3), cells, 64, 1 << 19)
