"""Native CPU kernels, compiled from ``kernels.c`` with the system's C compiler at first use.

The n-cell inner dimension of kernel assembly, ``W = a @ E`` with n from 2 to a few hundred, is a
shape that general matrix-product libraries run far below the CPU's peak (on AVX-512 AMD CPUs,
MKL's fallback code reaches about a quarter of it). :func:`mix_rows` computes it with a kernel made
for that shape, and is used only where it computes the same as the PyTorch product it replaces:
float32 tensors on the CPU, outside autograd, tracing and compilation (:func:`applies`).

Variants. ``kernels.c`` builds for one instruction set at a time, with its vector width and
register blocks sized to that set's registers (:data:`VARIANTS`, best first):

* ``avx512``: 16-float vectors in 32 zmm registers (``-mavx512f -mavx512vl -mavx2 -mfma``), for x86
  CPUs with ``avx512f`` and ``avx512vl``;
* ``avx2``: 8-float vectors in 16 ymm registers (``-mavx2 -mfma``, no AVX-512 instructions), for
  x86 CPUs with ``avx2`` and ``fma``;
* ``portable``: 4-float vectors in 16 registers and the compiler's default instruction set (SSE2
  on x86-64, NEON on aarch64, where ``-mcpu=native`` is added when the compiler takes it): ARM
  and Apple machines and every other CPU.

By default a process uses the best variant its CPU runs, read from the flags in ``/proc/cpuinfo``
(:func:`supported_variants`, :func:`variant`). ``KERNELWAREHOUSE_ISA=avx512|avx2|portable`` asks for
one: a variant the CPU cannot run falls back to the best it can, with a warning, and an unknown name
raises ValueError. :func:`load` gives the kernels of any supported variant beside the process's own,
for tests and benchmarks.

Each variant's library is built once per source, compiler, flags and CPU into
``$KERNELWAREHOUSE_CACHE`` (default ``~/.cache/kernelwarehouse``). Without a C compiler, on platforms
other than Linux, with ``KERNELWAREHOUSE_NATIVE=0``, or inside ``enabled(False)``, every caller falls
back to PyTorch's products, with a warning when a build was attempted and failed (a variant that fails
to build falls back to the next one, with a warning too).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch

from .. import tuning
from ..cache import cache_dir

__all__ = [
    "VARIANTS",
    "Kernels",
    "applies",
    "available",
    "cpu_features",
    "cpu_model",
    "enabled",
    "is_enabled",
    "load",
    "mix_rows",
    "rows_gradient",
    "fused_conv",
    "fused_weight_grad",
    "supported_variants",
    "variant",
    "worthwhile",
]

SOURCE = Path(__file__).with_name("kernels.c")
# -ffp-contract=fast: under -std=c11 GCC would not fuse the multiply-adds
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-ffp-contract=fast")

VARIANTS = ("avx512", "avx2", "portable")
# The /proc/cpuinfo flags each variant needs (x86 CPUs only; portable needs none) ...
_NEEDS = {
    "avx512": frozenset({"avx512f", "avx512vl", "avx2", "fma"}),
    "avx2": frozenset({"avx2", "fma"}),
    "portable": frozenset(),
}
# ... the vector width and register blocks of kernels.c (see there) ...
_MACROS = {
    "avx512": (
        "-DKW_LANES=16",
        "-DKW_MIX_ROWS=6",
        "-DKW_MIX_VECTORS=4",
        "-DKW_GRAD_ROWS=4",
        "-DKW_GRAD_CELLS=4",
    ),
    "avx2": (
        "-DKW_LANES=8",
        "-DKW_MIX_ROWS=6",
        "-DKW_MIX_VECTORS=2",
        "-DKW_GRAD_ROWS=3",
        "-DKW_GRAD_CELLS=3",
    ),
    "portable": (
        "-DKW_LANES=4",
        "-DKW_MIX_ROWS=6",
        "-DKW_MIX_VECTORS=2",
        "-DKW_GRAD_ROWS=3",
        "-DKW_GRAD_CELLS=3",
    ),
}
# ... and its instruction-set flags: the first set the compiler takes is used. The ISA is named feature by
# feature (not -march=native) so that a library runs on every CPU with the flags in _NEEDS.
_ISA = {
    "avx512": (
        ("-mavx512f", "-mavx512vl", "-mavx2", "-mfma", "-mtune=native"),
        ("-mavx512f", "-mavx512vl", "-mavx2", "-mfma"),
    ),
    "avx2": (("-mavx2", "-mfma", "-mtune=native"), ("-mavx2", "-mfma")),
    "portable": ((),),
}
_X86 = ("x86_64", "amd64", "i386", "i486", "i586", "i686", "x86")


_enabled = True


@contextlib.contextmanager
def enabled(flag: bool) -> Iterator[None]:
    """Use the native kernels (where they apply) or PyTorch's products inside the block."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    try:
        yield
    finally:
        _enabled = previous


def is_enabled() -> bool:
    """Whether the kernels may be used here (False inside ``enabled(False)``)."""
    return _enabled


def available() -> bool:
    """Whether the native kernels are built and loaded (building them if needed)."""
    return _library() is not None


def variant() -> str | None:
    """The variant of the kernels this process uses (one of :data:`VARIANTS`, building them if needed),
    or None where they are unavailable. Like :func:`available`, whatever :func:`enabled` says."""
    kernels = _library()
    return None if kernels is None else kernels.variant


def supported_variants() -> tuple[str, ...]:
    """The variants this CPU runs, best first; ``"portable"`` always."""
    return _supported(cpu_features(), platform.machine())


def load(name: str) -> Kernels | None:
    """The kernels of variant ``name``, built if needed, beside the ones the process uses: for tests and
    benchmarks, ``load("avx2").mix_rows(rows, cells)``. Ignores ``KERNELWAREHOUSE_NATIVE``,
    ``KERNELWAREHOUSE_ISA`` and :func:`enabled`. None where they cannot be built (no C compiler, not
    Linux, a failed build: with a warning); ValueError for a name not in :data:`VARIANTS` or a variant
    this CPU cannot run."""
    _check_name(name, "load")
    supported = supported_variants()
    if name not in supported:
        raise ValueError(
            f"kernelwarehouse: this CPU cannot run the {name} kernels ({_lacking(name)}); it runs "
            f"{', '.join(supported)}"
        )
    compiler = _compiler()
    if compiler is None or not sys.platform.startswith("linux"):
        return None
    kernels = _attempt(name, compiler, _cache())
    if isinstance(kernels, str):
        warnings.warn(
            f"kernelwarehouse: the {name} kernels failed to build ({kernels})", RuntimeWarning, stacklevel=2
        )
        return None
    return kernels


def worthwhile(macs: int, length: int) -> bool:
    """Whether a product of ``macs`` multiply-adds along rows of ``length`` pays for a native call:
    below :data:`kernelwarehouse.tuning.NATIVE_MIN_MACS` the call costs more than PyTorch's product,
    and rows shorter than :data:`kernelwarehouse.tuning.NATIVE_MIN_LENGTH` run mostly as scalar code."""
    return macs >= tuning.NATIVE_MIN_MACS and length >= tuning.NATIVE_MIN_LENGTH


def applies(*tensors: torch.Tensor) -> bool:
    """Whether :func:`mix_rows` may take these tensors: float32 on the CPU, no gradient to record,
    not being traced, scripted or compiled, and the library is available and :func:`enabled`."""
    if not _enabled or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    return available()


def mix_rows(
    rows: torch.Tensor, by_output: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False
) -> torch.Tensor:
    """``out[c] = rows @ by_output[c]`` for (r, n) rows and (c, n, d) cells, into ``out`` (c, r, d)
    when given, or ``out[c] += ...`` with ``accumulate``. Callers check :func:`applies` first."""
    return _loaded().mix_rows(rows, by_output, out, accumulate)


def rows_gradient(grad: torch.Tensor, by_output: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`mix_rows` with respect to its rows: ``sum_c grad[c] @ by_output[c]^T``
    for (c, r, d) ``grad`` and (c, n, d) cells, an (r, n) tensor. Callers check :func:`applies` first."""
    return _loaded().rows_gradient(grad, by_output)


def fused_conv(
    cols: torch.Tensor, rows: torch.Tensor, by_output: torch.Tensor, channels: int, tile_floats: int
) -> torch.Tensor:
    """``out[b] = cols[b] @ W_b^T``, each sample's weight assembled a tile at a time in cache and used
    at once: ``W_b[ob * c_out + c, q * d + e] = sum_j rows[b, ob, q, j] * by_output[c, j, e]``.
    ``cols``: (B, L, Q * d) patches, any strides; ``rows``: (B, out blocks, Q, n) mixture
    weights; ``by_output``: (c_out, n, d) cells, any strides. Returns (B, L, out blocks * c_out).
    Blocks of ``channels`` output channels; ``tile_floats`` bounds the floats of cells and assembled
    weights one thread keeps in cache. Callers check :func:`applies` first."""
    return _loaded().fused_conv(cols, rows, by_output, channels, tile_floats)


def fused_weight_grad(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``fused_weight_grad(cols, grad, rows, by_output, channels, tile_floats)`` (the arguments of
    :meth:`Kernels.fused_weight_grad`): the mixture and cell gradients of :func:`fused_conv` from
    ``grad`` (B, out blocks * c_out, L), the output's gradient, without building any whole weight
    gradient. With ``dW_b = grad[b] @ cols[b]``, the rows' gradient ``sum dW_b * cells`` (B, out
    blocks, Q, n) and the cells' ``sum rows * dW_b`` (c_out, n, d). Tiles of ``channels`` cell
    channels; ``tile_floats`` bounds the floats of weight-gradient tiles one thread keeps in cache.
    Callers check :func:`applies` first."""
    return _loaded().fused_weight_grad(*args, **kwargs)


# each kernel's arguments in kernels.c, one letter each (pointer, long, int), and its result
_ARGUMENT_TYPES = {"p": ctypes.c_void_p, "l": ctypes.c_long, "i": ctypes.c_int}
_SIGNATURES = {
    "kw_mix_rows": ("plipllllpllii", None),
    "kw_rows_gradient": ("plllpillllpi", None),
    "kw_fused_conv": ("pllllplliplllllplli", None),
    "kw_fused_weight_grad": ("pllllppllipllllpplli", ctypes.c_int),
}


class Kernels:
    """The kernels of one variant's library (:func:`load`): ``mix_rows``, ``rows_gradient``,
    ``fused_conv`` and ``fused_weight_grad`` as the module's functions, float32 CPU tensors only."""

    def __init__(self, variant: str, path: Path):
        self.variant, self.path = variant, path
        library = ctypes.CDLL(str(path))
        for name, (kinds, result) in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes = [_ARGUMENT_TYPES[kind] for kind in kinds]
            function.restype = result
        self._library = library

    def __repr__(self) -> str:
        return f"Kernels({self.variant!r}, {str(self.path)!r})"

    def mix_rows(
        self,
        rows: torch.Tensor,
        by_output: torch.Tensor,
        out: torch.Tensor | None = None,
        accumulate: bool = False,
    ) -> torch.Tensor:
        """:func:`mix_rows` of this variant."""
        channels, num, length = by_output.shape
        rows = rows.contiguous()
        if by_output.stride(2) != 1:
            by_output = by_output.contiguous()
        if out is None:
            if accumulate:
                raise ValueError("mix_rows: accumulate needs out")
            out = torch.empty(channels, rows.shape[0], length, dtype=rows.dtype)
        if rows.shape[1] != num or out.shape != (channels, rows.shape[0], length) or out.stride(2) != 1:
            raise ValueError(
                f"mix_rows: rows {tuple(rows.shape)}, cells {tuple(by_output.shape)} and out "
                f"{tuple(out.shape)} do not fit"
            )
        if out.numel():
            self._library.kw_mix_rows(
                rows.data_ptr(),
                rows.shape[0],
                num,
                by_output.data_ptr(),
                channels,
                by_output.stride(0),
                by_output.stride(1),
                length,
                out.data_ptr(),
                out.stride(0),
                out.stride(1),
                int(accumulate),
                torch.get_num_threads(),
            )
        return out

    def rows_gradient(self, grad: torch.Tensor, by_output: torch.Tensor) -> torch.Tensor:
        """:func:`rows_gradient` of this variant."""
        channels, num, length = by_output.shape
        if grad.shape[0] != channels or grad.shape[2] != length:
            raise ValueError(
                f"rows_gradient: grad {tuple(grad.shape)} does not fit cells {tuple(by_output.shape)}"
            )
        grad = grad if grad.stride(2) == 1 else grad.contiguous()
        by_output = by_output if by_output.stride(2) == 1 else by_output.contiguous()
        out = torch.empty(grad.shape[1], num, dtype=grad.dtype)
        if out.numel():
            self._library.kw_rows_gradient(
                grad.data_ptr(),
                grad.shape[1],
                grad.stride(0),
                grad.stride(1),
                by_output.data_ptr(),
                num,
                by_output.stride(0),
                by_output.stride(1),
                channels,
                length,
                out.data_ptr(),
                torch.get_num_threads(),
            )
        return out

    def fused_weight_grad(
        self,
        cols: torch.Tensor,
        grad: torch.Tensor,
        rows: torch.Tensor,
        by_output: torch.Tensor,
        channels: int,
        tile_floats: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`fused_weight_grad` of this variant."""
        batch, positions, width = cols.shape
        _, out_blocks, col_blocks, num = rows.shape
        c_out, cells_num, length = by_output.shape
        if (
            rows.shape[0] != batch
            or cells_num != num
            or col_blocks * length != width
            or grad.shape != (batch, out_blocks * c_out, positions)
        ):
            raise ValueError(
                f"fused_weight_grad: patches {tuple(cols.shape)}, output gradient {tuple(grad.shape)}, "
                f"rows {tuple(rows.shape)} and cells {tuple(by_output.shape)} do not fit"
            )
        cols = cols if cols.stride(2) == 1 else cols.contiguous()
        grad = grad.contiguous()
        rows_t = rows.reshape(-1, num).t().contiguous()
        if by_output.stride(2) != 1:
            by_output = by_output.contiguous()
        grad_rows = torch.empty(batch, out_blocks, col_blocks, num, dtype=cols.dtype)
        grad_cells = torch.empty(c_out, num, length, dtype=cols.dtype)
        if grad_rows.numel() and grad_cells.numel():
            failed = self._library.kw_fused_weight_grad(
                *_patches_arguments(cols),
                grad.data_ptr(),
                rows_t.data_ptr(),
                *_layout_arguments(rows, by_output),
                by_output.stride(0),
                by_output.stride(1),
                grad_rows.data_ptr(),
                grad_cells.data_ptr(),
                channels,
                tile_floats,
                torch.get_num_threads(),
            )
            if failed:
                raise MemoryError("fused_weight_grad: out of memory for the weight-gradient tiles")
        else:
            grad_rows.zero_(), grad_cells.zero_()
        return grad_rows, grad_cells

    def fused_conv(
        self, cols: torch.Tensor, rows: torch.Tensor, by_output: torch.Tensor, channels: int, tile_floats: int
    ) -> torch.Tensor:
        """:func:`fused_conv` of this variant."""
        batch, positions, width = cols.shape
        _, out_blocks, col_blocks, num = rows.shape
        c_out, cells_num, length = by_output.shape
        if rows.shape[0] != batch or cells_num != num or col_blocks * length != width:
            raise ValueError(
                f"fused_conv: patches {tuple(cols.shape)}, rows {tuple(rows.shape)} and cells "
                f"{tuple(by_output.shape)} do not fit"
            )
        cols = cols if cols.stride(2) == 1 else cols.contiguous()
        rows = rows.contiguous()
        out = torch.empty(batch, positions, out_blocks * c_out, dtype=cols.dtype)
        if out.numel():
            self._library.kw_fused_conv(
                *_patches_arguments(cols),
                rows.data_ptr(),
                *_layout_arguments(rows, by_output),
                *by_output.stride(),
                out.data_ptr(),
                channels,
                tile_floats,
                torch.get_num_threads(),
            )
        return out


def _patches_arguments(cols: torch.Tensor) -> tuple[int, ...]:
    """The fused kernels' first arguments: the patches, their batch and positions, and strides."""
    return (cols.data_ptr(), cols.shape[0], cols.shape[1], cols.stride(0), cols.stride(1))


def _layout_arguments(rows: torch.Tensor, by_output: torch.Tensor) -> tuple[int, ...]:
    """The fused kernels' blocks and cells: output and column blocks, n, the cells, d and c_out."""
    _, out_blocks, col_blocks, num = rows.shape
    return (out_blocks, col_blocks, num, by_output.data_ptr(), by_output.shape[2], by_output.shape[0])


def _loaded() -> Kernels:
    kernels = _library()
    if kernels is None:
        raise RuntimeError("kernelwarehouse: the native kernels are unavailable (check native.applies first)")
    return kernels


@functools.lru_cache(maxsize=None)
def _library() -> Kernels | None:
    """The kernels of this process: the variant asked for or the best one, looked up once."""
    if os.environ.get("KERNELWAREHOUSE_NATIVE", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    wanted, supported = _requested(), supported_variants()
    compiler = _compiler()
    if compiler is None:
        return None
    failures = []
    for name in supported[supported.index(wanted) :]:  # a variant that fails to build: the next one
        kernels = _attempt(name, compiler, _cache())
        if isinstance(kernels, Kernels):
            if failures:
                warnings.warn(
                    f"kernelwarehouse: using the {name} kernels, as {'; '.join(failures)}",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return kernels
        failures.append(f"the {name} kernels failed to build ({kernels})")
    warnings.warn(
        f"kernelwarehouse: native kernels unavailable, using PyTorch's products ({'; '.join(failures)})",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def _requested() -> str:
    """The variant ``KERNELWAREHOUSE_ISA`` asks for, if this CPU runs it, else the best it runs."""
    supported = supported_variants()
    name = os.environ.get("KERNELWAREHOUSE_ISA", "").strip().lower()
    if not name:
        return supported[0]
    _check_name(name, "KERNELWAREHOUSE_ISA")
    if name not in supported:
        warnings.warn(
            f"kernelwarehouse: KERNELWAREHOUSE_ISA={name}, but this CPU cannot run it ({_lacking(name)}); "
            f"using the {supported[0]} kernels",
            RuntimeWarning,
            stacklevel=4,
        )
        return supported[0]
    return name


def _check_name(name: str, where: str) -> None:
    if name not in VARIANTS:
        raise ValueError(
            f"kernelwarehouse: {where}: unknown variant {name!r}, valid ones are {', '.join(VARIANTS)}"
        )


def _lacking(name: str) -> str:
    if platform.machine().lower() not in _X86:
        return f"not an x86 CPU but {platform.machine()}"
    return "no " + ", ".join(sorted(_NEEDS[name] - set(cpu_features().split())))


def _supported(flags: str, machine: str) -> tuple[str, ...]:
    """The variants a CPU with these /proc/cpuinfo flags and this machine name runs, best first."""
    have, x86 = set(flags.split()), machine.lower() in _X86
    return tuple(name for name in VARIANTS if not _NEEDS[name] or x86 and _NEEDS[name] <= have)


def _select_variant(flags: str, machine: str = "x86_64") -> str:
    """The variant a CPU with these /proc/cpuinfo flags gets by default: the best one it runs."""
    return _supported(flags, machine)[0]


@functools.lru_cache(maxsize=None)
def _attempt(name: str, compiler: str, cache: Path) -> Kernels | str:
    """The kernels of a variant, or why they could not be built (remembered: a failed build is not
    retried)."""
    try:
        return Kernels(name, _build(compiler, name, cache))
    except (OSError, subprocess.SubprocessError) as error:
        return str(error)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cache() -> Path:
    return cache_dir()


def _isa_flags(name: str) -> tuple[tuple[str, ...], ...]:
    if name == "portable" and platform.machine().lower() in ("aarch64", "arm64"):
        return (("-mcpu=native",), ())  # -mcpu=native where the compiler takes it
    return _ISA[name]


def _build(compiler: str, variant: str, cache: Path | None = None) -> Path:
    """Compile ``kernels.c`` for ``variant`` into the cache, keyed by source, compiler, variant, flags and
    CPU, unless there. The variant's ISA flags are tried in order: the first set the compiler takes."""
    cache = _cache() if cache is None else cache
    source = SOURCE.read_bytes()
    builds = []
    for isa in _isa_flags(variant):
        flags = (*FLAGS, *_MACROS[variant], *isa)
        key = hashlib.sha256()
        for part in (
            source,
            compiler.encode(),
            variant.encode(),
            " ".join(flags).encode(),
            cpu_features().encode(),
        ):
            key.update(part)
        builds.append((flags, cache / f"kernels-{variant}-{key.hexdigest()[:16]}.so"))
    for flags, target in builds:
        if target.exists():
            return target
    cache.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags, target in builds:
        handle, partial = tempfile.mkstemp(dir=cache, suffix=".so.partial")
        os.close(handle)
        try:
            done = subprocess.run(
                [compiler, *flags, str(SOURCE), "-o", partial], capture_output=True, text=True, timeout=300
            )
            if done.returncode == 0:
                os.replace(partial, target)  # atomic: processes building at once each leave a whole file
                return target
            errors.append(f"{compiler} {' '.join(flags[len(FLAGS) :])} failed: {done.stderr.strip()[-300:]}")
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    raise OSError("; ".join(errors))


@functools.lru_cache(maxsize=None)
def cpu_features() -> str:
    """The CPU's instruction-set flags, from /proc/cpuinfo ("flags" on x86, "Features" on ARM)."""
    return _cpuinfo(("flags", "Features"))


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module knows."""
    return _cpuinfo(("model name",)) or platform.processor() or platform.machine()


def _cpuinfo(fields: tuple[str, ...]) -> str:
    try:
        with open("/proc/cpuinfo") as info:
            line = next((line for line in info if line.startswith(fields)), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()
