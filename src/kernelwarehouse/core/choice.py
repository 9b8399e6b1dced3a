"""The measured choice of execution path: what ``auto`` runs, decided by timing on this machine.

Like ``torch.backends.cudnn.benchmark``: the first time a layer call (:class:`.paths.LayerCall`:
shapes, batch, dtype, device, threads, native kernels, training or not) is seen, each candidate
path (:func:`.paths.candidates`) runs on the call's own tensors, once untimed and then
:data:`~kernelwarehouse.tuning.MEASURE_REPEATS` times; the fastest run decides, and the choice is
reused for every later call of that geometry. Timing works on detached copies (no gradient reaches
the model, no random number is drawn), so a measured step computes what an unmeasured one does.

Choices persist in a JSON file in ``$KERNELWAREHOUSE_CACHE`` (default
``~/.cache/kernelwarehouse``), one per machine (CPU model and instruction set, native kernels
variant, torch and package versions, the registered paths), written atomically; a damaged file is
ignored with a warning. ``KERNELWAREHOUSE_PATH_CACHE=0`` keeps choices in memory only.

``KERNELWAREHOUSE_PATH_CHOICE=rule`` (or :func:`set_path_choice` / :func:`path_choice`) replaces
timing by the fixed rule :func:`.paths.rule_choice`: deterministic across machines, for tests.
Under ``torch.distributed`` rank 0 decides the paths of training calls (measures, or reads its
cache) and every rank runs its choice; each rank decides its own inference calls.
:func:`path_choices` and :func:`load_path_choices` carry the table, e.g. in a checkpoint, so a
resumed run takes the paths of the run it continues.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Mapping, TypeVar

import torch

from .. import native, tuning
from ..cache import cache_dir
from .paths import REGISTRY, LayerCall, check_choice

__all__ = [
    "MODES",
    "cache_file",
    "clear_path_choices",
    "get_path_choice",
    "load_path_choices",
    "path_choice",
    "path_choices",
    "set_path_choice",
]

MODES = ("measured", "rule")
T = TypeVar("T")

_mode = os.environ.get("KERNELWAREHOUSE_PATH_CHOICE", "measured")
_table: dict[str, str] = {}
_by_call: dict[LayerCall, str] = {}  # the same choices, found without building the key text
_disk: dict[str, dict] | None = None  # this machine's cache file, read once


def set_path_choice(mode: str) -> str:
    """How ``auto`` chooses: ``"measured"`` (the default) or ``"rule"``; returns the previous mode."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"path choice must be one of {MODES}, got {mode!r}")
    previous, _mode = _mode, mode
    return previous


def get_path_choice() -> str:
    if _mode not in MODES:
        raise ValueError(f"KERNELWAREHOUSE_PATH_CHOICE must be one of {MODES}, got {_mode!r}")
    return _mode


@contextlib.contextmanager
def temporarily(setter: Callable[[T], T], value: T) -> Iterator[None]:
    """The context manager form of a setter that returns the previous value: ``value`` inside the
    ``with`` block, the previous one again after it."""
    previous = setter(value)
    try:
        yield
    finally:
        setter(previous)


def path_choice(mode: str) -> ContextManager[None]:
    """Context manager form of :func:`set_path_choice`."""
    return temporarily(set_path_choice, mode)


def path_choices() -> dict[str, str]:
    """The choices made so far in this process (and loaded), as {call key: choice}."""
    return dict(_table)


def load_path_choices(choices: Mapping[str, str]) -> None:
    """Take these choices (from :func:`path_choices`, e.g. of a checkpoint) over measuring."""
    for key, choice in choices.items():
        if not isinstance(key, str) or not isinstance(choice, str):
            raise ValueError(f"path choices map call keys to path names, got {key!r}: {choice!r}")
        check_choice(choice)
    _table.update(choices)
    _by_call.clear()


def clear_path_choices() -> None:
    """Forget the choices of this process (the cache file stays)."""
    _table.clear()
    _by_call.clear()


def measured(
    call: LayerCall,
    candidates: list[str],
    runner: Callable[[str], Callable[[], None]],
    fallback: Callable[[], str],
) -> str:
    """The measured choice for ``call`` among ``candidates``; ``runner(choice)`` gives a function
    that runs the call along ``choice`` once. ``fallback()`` gives the rule's choice, taken where
    timing cannot run here (inside a saved-tensors hook region such as activation checkpointing)."""
    choice = _by_call.get(call)
    if choice is not None:
        return choice
    key = call.key()
    choice = _table.get(key)
    if choice is not None:
        _by_call[call] = choice
        return choice
    store = _shared_store(call)
    if store is not None and torch.distributed.get_rank() != 0:
        choice = store.get(_STORE_PREFIX + key).decode()  # waits for rank 0's choice
        check_choice(choice)
    elif len(candidates) == 1:
        choice = candidates[0]
    else:
        choice = _cached(key, candidates)
        if choice is None:
            if call.grad and _saved_tensor_hooks_active():
                return fallback()  # not recorded: measured at the next call outside the region
            times: dict[str, float] = {}
            for candidate in candidates:
                times[candidate] = time_candidate(
                    runner(candidate), call.device, candidate, min(times.values(), default=float("inf"))
                )
            choice = min(times, key=times.__getitem__)
            _store(key, choice, times)
    if store is not None and torch.distributed.get_rank() == 0:
        store.set(_STORE_PREFIX + key, choice)
    _table[key] = _by_call[call] = choice
    return choice


_STORE_PREFIX = "kernelwarehouse/path/"


def _shared_store(call: LayerCall):
    """The process group's key-value store when rank 0 decides for every rank: training calls under
    torch.distributed (DDP ranks step in lockstep, so each sees the same geometries). Inference
    calls decide on each rank: evaluation shards may differ in batch count and size."""
    dist = torch.distributed
    if not (call.grad and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return dist.distributed_c10d._get_default_store()


def time_candidate(run: Callable[[], None], device: str, name: str, best: float = float("inf")) -> float:
    """Seconds of the fastest of :data:`~kernelwarehouse.tuning.MEASURE_REPEATS` runs of candidate
    ``name`` after one warm-up; stops early once a run takes over twice ``best``, the fastest
    candidate so far, or the warm-up over :data:`~kernelwarehouse.tuning.MEASURE_WARMUP_STOP` times
    it (it cannot win). The one place that reads a clock: tests replace it."""
    cuda = device.startswith("cuda")
    warm_up = _seconds(run, cuda)
    if warm_up > tuning.MEASURE_WARMUP_STOP * best:
        return warm_up
    fastest = float("inf")
    for _ in range(tuning.MEASURE_REPEATS):
        fastest = min(fastest, _seconds(run, cuda))
        if fastest > 2 * best:
            break
    return fastest


def _seconds(run: Callable[[], None], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _saved_tensor_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


# -- the persistent cache ---------------------------------------------------------------------------


def cache_file() -> Path | None:
    """This machine's file of measured choices, or None when persistence is off."""
    if os.environ.get("KERNELWAREHOUSE_PATH_CACHE", "1") == "0":
        return None
    from .. import __version__

    # the registered paths and their backward forms too: choices made before a path or a form was
    # added would never time it
    paths = ",".join(f"{name}:{'/'.join(path.backwards)}" for name, path in REGISTRY.items())
    identity = json.dumps(_machine(), sort_keys=True) + torch.__version__ + __version__ + paths
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir() / f"paths-{digest}.json"


@functools.lru_cache(maxsize=None)
def _machine() -> dict[str, str]:
    """What identifies this machine's timings (read once per process)."""
    machine = {
        "cpu": native.cpu_model(),
        "isa": hashlib.sha256(native.cpu_features().encode()).hexdigest()[:12],
        "native": str(native.variant()),
    }
    if torch.cuda.is_available():
        machine["gpus"] = ",".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return machine


def _read_disk() -> dict[str, dict]:
    global _disk
    if _disk is None:
        _disk = {}
        path = cache_file()
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
                if not isinstance(data, dict) or not isinstance(data.get("choices"), dict):
                    raise ValueError("no 'choices' table")
                _disk = {k: v for k, v in data["choices"].items() if isinstance(v, dict) and "path" in v}
            except (OSError, ValueError) as error:
                warnings.warn(
                    f"kernelwarehouse: ignoring the damaged path cache {path} ({error}); "
                    f"paths are measured again",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _disk


def _cached(key: str, candidates: list[str]) -> str | None:
    entry = _read_disk().get(key)
    choice = entry.get("path") if entry else None
    return choice if choice in candidates else None


def _store(key: str, choice: str, times: dict[str, float]) -> None:
    disk = _read_disk()
    disk[key] = {"path": choice, "ms": {c: round(t * 1e3, 4) for c, t in times.items()}}
    path = cache_file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # another process may have added choices since this one read the file
            with contextlib.suppress(OSError, ValueError, AttributeError):
                for k, v in json.loads(path.read_text()).get("choices", {}).items():
                    disk.setdefault(k, v)
        handle, partial = tempfile.mkstemp(dir=path.parent, prefix=".paths-", suffix=".partial")
        with os.fdopen(handle, "w") as f:
            json.dump({"machine": _machine(), "choices": disk}, f, indent=1, sort_keys=True)
        os.replace(partial, path)
    except OSError as error:
        warnings.warn(
            f"kernelwarehouse: cannot write the path cache {path} ({error})", RuntimeWarning, stacklevel=2
        )
