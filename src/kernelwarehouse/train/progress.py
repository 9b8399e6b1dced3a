"""Signs of life during training: tqdm bars on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import time
from typing import Callable

#: seconds between the plain progress lines of a run whose output is not a terminal (log files, CI)
PROGRESS_LINE_SECONDS = 30.0


class ProgressLines:
    """Plain progress lines within an epoch (step, images/s, loss, lr, tau, time left of the epoch),
    one every :data:`PROGRESS_LINE_SECONDS`, for output that is not a terminal."""

    def __init__(self, log: Callable[[str], None], epoch: int, epochs: int, steps: int) -> None:
        self.log, self.epoch, self.epochs, self.steps = log, epoch, epochs, steps
        self.start = self.last = time.perf_counter()
        self.images = 0

    def step(self, done: int, images: int, loss: float, lr: float, tau: float | None) -> None:
        self.images += images
        now = time.perf_counter()
        if now - self.last < PROGRESS_LINE_SECONDS or done == self.steps:
            return
        self.last, elapsed = now, now - self.start
        left = elapsed / done * (self.steps - done)
        tau_text = "" if tau is None else f"  tau {tau:.3f}"
        self.log(
            f"epoch {self.epoch + 1}/{self.epochs}  step {done}/{self.steps}  "
            f"{self.images / elapsed:.1f} img/s  "
            f"loss {loss:.4f}  lr {lr:.4g}{tau_text}  epoch ends in {int(left) // 60}m{int(left) % 60:02d}s"
        )


def progress_bar(iterable, enabled: bool, description: str, leave: bool = True):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=description, leave=leave, dynamic_ncols=True)


def print_above_bars(message: str) -> None:
    """Print a line without breaking the progress bars."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(message)
    else:
        tqdm.write(message)
