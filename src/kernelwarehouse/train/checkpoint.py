"""Training checkpoints: written atomically, read with a clear error when corrupt or foreign.

A checkpoint is a dict with ``format`` = :data:`FORMAT`, ``config`` (the full run config), ``model``
(state_dict), ``optimizer``, ``scheduler``, ``temperature``, ``ema``, ``scaler``, ``epoch`` (epochs
done), ``step``, ``best``, ``history``, ``rng`` (every random state) and ``path_choices`` (the execution
paths taken, reused on resume). It loads with
``torch.load(weights_only=True)``: only tensors and plain Python values are stored.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..models.registry import parse_budget

FORMAT = "kernelwarehouse-train"
VERSION = 1
IDENTITY_KEYS = ("model", "budget", "model_kwargs", "data", "limit_train", "limit_val", "image_size")


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` through a temporary file and a rename: a reader, or a run killed
    while writing, sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give a finished temporary file the usual permissions and rename it over ``path``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint; ValueError naming the file if it is unreadable or not ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {reason[:200]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a kernelwarehouse training checkpoint (written by kw train)")
    if state.get("version") != VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {state.get('version')}, "
            f"this kw reads version {VERSION}"
        )
    missing = [k for k in ("config", "model", "epoch", "step", "data_info") if k not in state]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {', '.join(missing)}")
    return state


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "budget" and a is not None and b is not None:
        return parse_budget(a) == parse_budget(b)
    return a == b


def config_differences(
    saved: Mapping[str, Any], wanted: Mapping[str, Any], keys: tuple[str, ...] = IDENTITY_KEYS
) -> list[str]:
    """'key: saved -> wanted' for each identity key whose value differs."""
    return [
        f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}"
        for k in keys
        if not _same(k, saved.get(k), wanted.get(k))
    ]


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python random states, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
