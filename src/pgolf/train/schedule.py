"""Learning-rate scale schedules (SPEC §4.5, §5.26) and the training fraction they share.

Baseline (§4.5): no LR warm-up; constant, then a linear warm-down to zero over the last
`warmdown_iters` steps. With a wall-clock cap the window is predicted from the running average
step time, so the scale reaches 0 exactly when the cap does, however fast the hardware is.

Wall-clock fraction (§5.26, S1394+): `frac` = counted time / effective cap (or step / iterations
without a cap); the scale falls linearly over the last `warmdown_frac` of the run, floored at
`min_lr`. An optional linear LR warm-up multiplies either.
"""

from __future__ import annotations

from pgolf.train.config import TrainConfig


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


def training_frac(
    step: int, elapsed_ms: float, iterations: int, max_wallclock_ms: float | None
) -> float:
    """How far through the run we are: time over the cap when capped, else steps over the total.

    Upstream (S1394) uses the time fraction whenever a cap is set, even if the step cap would
    end the run first; kept so that presets reproduce the records.
    """
    if max_wallclock_ms:
        return elapsed_ms / max(max_wallclock_ms, 1e-9)
    return step / max(iterations, 1)


def frac_warmdown_scale(frac: float, warmdown_frac: float, min_lr: float) -> float:
    """SPEC §5.26: 1 until `1 − F`, then `max((1 − frac)/F, min_lr)`."""
    if warmdown_frac <= 0:
        return 1.0
    if frac >= 1.0 - warmdown_frac:
        return max((1.0 - frac) / warmdown_frac, min_lr)
    return 1.0


def warmup_factor(step: int, lr_warmup_steps: int) -> float:
    """Linear LR warm-up: step 0 runs at 1/W of the lr, step W−1 and later at the full lr."""
    if lr_warmup_steps <= 0:
        return 1.0
    return min((step + 1) / lr_warmup_steps, 1.0)


def warmdown_scale(
    cfg: TrainConfig, step: int, elapsed_ms: float, max_wallclock_ms: float | None
) -> float:
    """The warm-down part of the LR scale, whichever warm-down is configured.

    This is the number LR-keyed switches compare against (SWA start, late QAT): they mean "this
    far into the warm-down", which an LR warm-up at the start of the run must not trigger.
    `max_wallclock_ms` is the effective cap (the cap minus the calibration reserve), so the
    warm-down ends where training does, not where the reserve does.
    """
    if cfg.warmdown_frac > 0:
        frac = training_frac(step, elapsed_ms, cfg.iterations, max_wallclock_ms)
        return frac_warmdown_scale(frac, cfg.warmdown_frac, cfg.min_lr)
    scale = lr_scale(step, elapsed_ms, cfg.iterations, cfg.warmdown_iters, max_wallclock_ms)
    if cfg.min_lr > 0 and cfg.warmdown_iters > 0:
        scale = max(scale, cfg.min_lr)
    return scale


def scheduled_lr_scale(
    cfg: TrainConfig, step: int, elapsed_ms: float, max_wallclock_ms: float | None
) -> float:
    """The LR scale the trainer applies before step `step`: warm-down times warm-up."""
    decay = warmdown_scale(cfg, step, elapsed_ms, max_wallclock_ms)
    return decay * warmup_factor(step, cfg.lr_warmup_steps)
