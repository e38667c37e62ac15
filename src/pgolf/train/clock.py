"""The budget clock: wall time split into what the rules count (SPEC §1.3).

Training time excludes compile warm-up and validation pauses; calibration that reads training data
is charged to training; everything after the artifact is loaded is evaluation time. On CUDA the
clock synchronises before reading the time so queued kernels are not left uncounted.
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
        self.calib_ms = 0.0
        self.eval_ms = 0.0
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

    @contextlib.contextmanager
    def measure(self, bucket: str) -> Iterator[None]:
        """Charge the block's wall time to `calib` or `eval`."""
        _sync(self.device)
        t0 = self.now()
        try:
            yield
        finally:
            _sync(self.device)
            ms = 1000.0 * (self.now() - t0)
            setattr(self, f"{bucket}_ms", getattr(self, f"{bucket}_ms") + ms)
