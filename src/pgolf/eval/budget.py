"""The evaluation clock: what eval time went where, and the 600 s cap (SPEC §1.3).

Everything after loading the artifact counts as evaluation (dequantise, scoring, TTT). The clock
accumulates named laps (`score`, `ttt_train`, `baseline`) and, when a cap is set, answers "stop?"
the same way on every rank: ranks agree on the largest elapsed time, so none is left waiting in a
collective that the others skipped.
"""

from __future__ import annotations

import contextlib
import time
import warnings

import torch

from pgolf.dist import World, all_reduce_max

CAP_ACTIONS = ("warn", "stop")


class EvalClock:
    def __init__(
        self, cap_s: float, action: str, world: World, started_at: float | None = None
    ) -> None:
        if action not in CAP_ACTIONS:
            raise ValueError(f"unknown cap action {action!r}; expected one of {CAP_ACTIONS}")
        self.cap_s = cap_s
        self.action = action
        self.world = world
        self.started_at = time.perf_counter() if started_at is None else started_at
        self.laps: dict[str, float] = {}
        self.over_cap = False
        self.stopped = False

    def _sync(self) -> None:
        # CUDA work is asynchronous: without a sync the time of queued kernels lands in a later lap.
        if self.world.is_cuda:
            torch.cuda.synchronize(self.world.device)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started_at

    @contextlib.contextmanager
    def lap(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.laps[name] = self.laps.get(name, 0.0) + time.perf_counter() - t0

    def should_stop(self) -> bool:
        """True once the cap is passed and the action is "stop"; warns once either way.

        A collective when distributed and a cap is set: call it at the same points on every rank.
        """
        if self.cap_s <= 0:
            return False
        elapsed = all_reduce_max(self.elapsed(), self.world)
        if elapsed > self.cap_s and not self.over_cap:
            self.over_cap = True
            stopping = self.action == "stop"
            then = "; stopping, the score covers only what was scored" if stopping else ""
            warnings.warn(
                f"evaluation passed its {self.cap_s:g} s cap ({elapsed:.1f} s){then}",
                RuntimeWarning,
                stacklevel=2,
            )
        self.stopped = self.over_cap and self.action == "stop"
        return self.stopped

    def record(self) -> dict:
        return {
            "total_s": self.elapsed(),
            **{f"{name}_s": seconds for name, seconds in sorted(self.laps.items())},
            "cap_s": self.cap_s,
            "cap_action": self.action,
            "over_cap": self.over_cap,
            "stopped_by_cap": self.stopped,
        }
