"""Where kernelwarehouse keeps what it builds or measures on this machine: the native kernels and
the measured path choices. ``$KERNELWAREHOUSE_CACHE``, else ``$XDG_CACHE_HOME/kernelwarehouse``,
else ``~/.cache/kernelwarehouse``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    explicit = os.environ.get("KERNELWAREHOUSE_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kernelwarehouse"
