"""The baseline learning-rate scale: constant, then a linear warm-down to zero (SPEC §4.5).

There is no LR warm-up. With a wall-clock cap the warm-down window is predicted from the running
average step time, so the scale reaches 0 exactly when the cap does, however fast the hardware is.
"""

from __future__ import annotations


def lr_scale(
    step: int,
    elapsed_ms: float,
    iterations: int,
    warmdown_iters: int,
    max_wallclock_ms: float | None,
) -> float:
    """Multiplier on every optimiser's base lr before optimisation step `step` (0-based)."""
    if warmdown_iters <= 0:
        return 1.0
    if not max_wallclock_ms:
        start = max(iterations - warmdown_iters, 0)
        if start <= step < iterations:
            return max((iterations - step) / max(warmdown_iters, 1), 0.0)
        return 1.0
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = warmdown_iters * step_ms
    remaining_ms = max(max_wallclock_ms - elapsed_ms, 0.0)
    # At step 0 nothing has been timed, so warmdown_ms is 0 and the scale stays 1 unless the cap is
    # already spent; the guard keeps that case from dividing by zero.
    if remaining_ms <= warmdown_ms:
        return remaining_ms / max(warmdown_ms, 1e-9)
    return 1.0
