"""Native CPU kernels, compiled from ``kernels.c`` with the system's C compiler at first use.

The n-cell inner dimension of kernel assembly, ``W = a @ E`` with n from 2 to a few hundred, is a
shape that general matrix-product libraries run far below the CPU's peak (on AVX-512 AMD CPUs,
MKL's fallback code reaches about a quarter of it). :func:`mix_rows` computes it with a kernel made
for that shape, and is used only where it computes the same as the PyTorch product it replaces:
float32 tensors on the CPU, outside autograd, tracing and compilation (:func:`applies`).

The library is built once per source, compiler and CPU into ``$KERNELWAREHOUSE_CACHE`` (default
``~/.cache/kernelwarehouse``). Without a C compiler, on platforms other than Linux, with
``KERNELWAREHOUSE_NATIVE=0``, or inside ``enabled(False)``, every caller falls back to PyTorch's
products, with a warning when a build was attempted and failed.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["applies", "available", "enabled", "mix_rows", "rows_gradient", "worthwhile"]

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")


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


def available() -> bool:
    """Whether the native kernels are built and loaded (building them if needed)."""
    return _library() is not None


def worthwhile(macs: int, length: int) -> bool:
    """Whether a product of ``macs`` multiply-adds along rows of ``length`` pays for a native call:
    below :data:`MIN_MACS` the call costs more than PyTorch's product, and rows shorter than
    :data:`MIN_LENGTH` (one vector) run as scalar code."""
    return macs >= MIN_MACS and length >= MIN_LENGTH


# Measured on CPU against PyTorch's batched product: 1.5-3x slower up to 1.5e5 multiply-adds (call
# and thread start-up), 1.3x faster at 6e5, 2-3x faster from 4e6 on.
MIN_MACS = 1 << 18
MIN_LENGTH = 16


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


def mix_rows(rows: torch.Tensor, by_output: torch.Tensor, out: torch.Tensor | None = None,
             accumulate: bool = False) -> torch.Tensor:
    """``out[c] = rows @ by_output[c]`` for (r, n) rows and (c, n, d) cells, into ``out`` (c, r, d)
    when given, or ``out[c] += ...`` with ``accumulate``. Callers check :func:`applies` first."""
    channels, num, length = by_output.shape
    rows = rows.contiguous()
    if by_output.stride(2) != 1:
        by_output = by_output.contiguous()
    if out is None:
        if accumulate:
            raise ValueError("mix_rows: accumulate needs out")
        out = torch.empty(channels, rows.shape[0], length, dtype=rows.dtype)
    if rows.shape[1] != num or out.shape != (channels, rows.shape[0], length) or out.stride(2) != 1:
        raise ValueError(f"mix_rows: rows {tuple(rows.shape)}, cells {tuple(by_output.shape)} and out "
                         f"{tuple(out.shape)} do not fit")
    if out.numel():
        _library().kw_mix_rows(rows.data_ptr(), rows.shape[0], num, by_output.data_ptr(), channels,
                               by_output.stride(0), by_output.stride(1), length, out.data_ptr(), out.stride(0),
                               out.stride(1), int(accumulate), torch.get_num_threads())
    return out


def rows_gradient(grad: torch.Tensor, by_output: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`mix_rows` with respect to its rows: ``sum_c grad[c] @ by_output[c]^T``
    for (c, r, d) ``grad`` and (c, n, d) cells, an (r, n) tensor. Callers check :func:`applies` first."""
    channels, num, length = by_output.shape
    if grad.shape[0] != channels or grad.shape[2] != length:
        raise ValueError(f"rows_gradient: grad {tuple(grad.shape)} does not fit cells {tuple(by_output.shape)}")
    grad = grad if grad.stride(2) == 1 else grad.contiguous()
    by_output = by_output if by_output.stride(2) == 1 else by_output.contiguous()
    out = torch.empty(grad.shape[1], num, dtype=grad.dtype)
    if out.numel():
        _library().kw_rows_gradient(grad.data_ptr(), grad.shape[1], grad.stride(0), grad.stride(1),
                                    by_output.data_ptr(), num, by_output.stride(0), by_output.stride(1), channels,
                                    length, out.data_ptr(), torch.get_num_threads())
    return out


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("KERNELWAREHOUSE_NATIVE", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        warnings.warn(f"kernelwarehouse: native kernels unavailable, using PyTorch's products ({error})",
                      RuntimeWarning, stacklevel=3)
        return None
    size, pointer = ctypes.c_long, ctypes.c_void_p
    library.kw_mix_rows.argtypes = [pointer, size, ctypes.c_int, pointer, size, size, size, size, pointer, size,
                                    size, ctypes.c_int, ctypes.c_int]
    library.kw_mix_rows.restype = None
    library.kw_rows_gradient.argtypes = [pointer, size, size, size, pointer, ctypes.c_int, size, size, size, size,
                                         pointer, ctypes.c_int]
    library.kw_rows_gradient.restype = None
    return library


def _build(compiler: str) -> Path:
    """Compile ``kernels.c`` into the cache, keyed by source, compiler, flags and CPU, unless there."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode(), _cpu_features().encode()):
        key.update(part)
    cache = Path(os.environ.get("KERNELWAREHOUSE_CACHE")
                 or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kernelwarehouse")
    target = cache / f"kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=cache, suffix=".so.partial")
    os.close(handle)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(partial, target)  # atomic: processes building at once each leave a whole file
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


def _cpu_features() -> str:
    """The CPU's instruction-set flags: a library built with -march=native runs only where they match."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""
