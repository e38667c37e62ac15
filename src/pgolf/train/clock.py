"""The training clock: the wall time the training rule counts (SPEC §1.3).

Training time excludes compile warm-up and validation pauses. The other budgets are timed where
they happen: calibration that reads training data by `pgolf.quant.pipeline.calibrate` (charged to
training through its reserve), and everything from loading the artifact on by the evaluation. On
CUDA the clock synchronises before reading the time so queued kernels are not left uncounted.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BudgetClock:
    def __init__(
        self,
        device: torch.device,
        train_ms: float = 0.0,
        now: Callable[[], float] = time.perf_counter,
    ):
        self.device = device
        self.now = now  # seconds; tests pass a fake clock
        self.train_ms = train_ms  # accumulated counted training time
        self._running_since: float | None = None

    def start(self) -> None:
        _sync(self.device)
        self._running_since = self.now()

    def elapsed_train_ms(self) -> float:
        """Counted training time so far, including the current running stretch."""
        if self._running_since is None:
            return self.train_ms
        _sync(self.device)
        return self.train_ms + 1000.0 * (self.now() - self._running_since)

    def stop(self) -> float:
        self.train_ms = self.elapsed_train_ms()
        self._running_since = None
        return self.train_ms

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Work inside (validation, checkpointing) is not training time."""
        was_running = self._running_since is not None
        if was_running:
            self.stop()
        try:
            yield
        finally:
            if was_running:
                self.start()
