"""Weight averaging: EMA of the full state (SPEC §5.5), SWA snapshots (§5.6) and their blend.

The trained model that gets quantised and scored is an average of the weights along the end of the
trajectory, not the last iterate. Two kinds, usable alone or together:

- EMA: an fp32 shadow of every state-dict tensor, `ema ← d·ema + (1 − d)·w` after each optimiser
  step, starting from the initial weights as upstream does.
- SWA: the uniform mean of snapshots taken every `swa_every` steps while the LR scale is below
  `swa_start_frac`, summed in fp32 (P639 summed bf16 tensors in bf16, which rounds). With
  `swa_every_frac` the interval is instead a share of the expected run length, counted from the
  previous snapshot.

With both, the result is `(1 − swa_weight)·EMA + swa_weight·SWA` (P639: 0.5). Unlike S414–S1060,
whose SWA sum was collected and thrown away, SWA here is always used when switched on.

The EMA window must fit the run. A decay d averages over about 1/(1 − d) steps; the records'
0.997 (333 steps) is about 1/21 of their ≈7,000-step runs, but over 400 steps it still gives the
untrained initial weights 0.997⁴⁰⁰ ≈ 30 % of the average. So by default the window is the
record's, scaled by the expected run length over the record's:
`1 − d = (1 − ema_reference_decay) · ema_reference_steps / expected_steps`, which is exactly the
record's decay at the record's step count (a preset carries its record's two numbers) and shrinks
with shorter runs. The expected steps are predicted like the warm-down (§4.5) from the average
step time when a wall-clock cap binds. An absolute decay (EMA_DECAY) still wins when set, and
draws a warning if its window is longer than `ema_max_window_frac` of the run.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from pgolf.errors import PgolfError
from pgolf.train.config import TrainConfig


def decay_for_run(reference_decay: float, reference_steps: float, expected_steps: float) -> float:
    """The reference decay with its window scaled from `reference_steps` to `expected_steps`.

    Equal to `reference_decay`, bit for bit, when the two step counts are equal; the window
    1/(1 − d) never drops below one step (d = 0: the average is the last weights).
    """
    if not 0.0 < reference_decay < 1.0 or reference_steps <= 0:
        raise PgolfError(
            f"train.ema_reference_decay={reference_decay} must be in (0, 1) and "
            f"train.ema_reference_steps={reference_steps} > 0"
        )
    ratio = reference_steps / max(expected_steps, 1.0)
    return 1.0 - min((1.0 - reference_decay) * ratio, 1.0)


def expected_steps(
    step: int, elapsed_ms: float, iterations: int, max_wallclock_ms: float | None
) -> float:
    """The run's length in steps as predicted after `step` steps: the earlier of the two caps."""
    if not max_wallclock_ms or step <= 0 or elapsed_ms <= 0:
        return float(iterations)
    return min(float(iterations), step * max_wallclock_ms / elapsed_ms)


def ema_window_warning(decay: float, run_steps: float, max_share: float) -> str | None:
    """A message when a fixed decay's window is longer than `max_share` of the run, else None."""
    if decay <= 0 or decay >= 1 or max_share <= 0 or run_steps <= 0:
        return None
    window = 1.0 / (1.0 - decay)
    if window <= max_share * run_steps:
        return None
    init_share = decay**run_steps
    return (
        f"EMA decay {decay} averages over ~{window:.0f} steps, more than {max_share:.0%} of this "
        f"{run_steps:.0f}-step run (the initial weights keep {init_share:.1%} of the average); "
        "leave train.ema_decay at 0 to scale the window with the run (train.ema_reference_*)"
    )


class WeightAverager:
    """EMA and/or SWA of a model's state dict, checkpointable so that resume stays bit-exact."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.cfg = cfg
        self.use_ema = cfg.ema_enabled
        self.use_swa = cfg.swa_enabled
        state = model.state_dict()
        self.keys = [k for k, v in state.items() if v.is_floating_point()]
        self.device = state[self.keys[0]].device if self.keys else torch.device("cpu")
        self.ema: dict[str, torch.Tensor] = {}
        if self.use_ema:
            self.ema = {k: state[k].detach().float().clone() for k in self.keys}
        self.swa_sum: dict[str, torch.Tensor] = {}
        self.swa_count = 0
        self.swa_last_step = 0
        self.last_decay = 0.0

    @property
    def enabled(self) -> bool:
        return self.use_ema or self.use_swa

    def decay(self, step: int, elapsed_ms: float, max_wallclock_ms: float | None) -> float:
        """The EMA decay applied after optimiser step number `step` (1-based)."""
        if self.cfg.ema_decay > 0:
            return self.cfg.ema_decay
        c = self.cfg
        n = expected_steps(step, elapsed_ms, c.iterations, max_wallclock_ms)
        return decay_for_run(c.ema_reference_decay, c.ema_reference_steps, n)

    @torch.no_grad()
    def update(
        self,
        model: nn.Module,
        step: int,
        lr_scale: float,
        elapsed_ms: float,
        max_wallclock_ms: float | None,
    ) -> None:
        """Fold in the weights after optimiser step `step` (1-based) taken at `lr_scale`."""
        if not self.enabled:
            return
        state = model.state_dict()
        current = [state[k].detach().float() for k in self.keys]
        if self.use_ema:
            d = self.decay(step, elapsed_ms, max_wallclock_ms)
            self.last_decay = d
            shadow = [self.ema[k] for k in self.keys]
            torch._foreach_mul_(shadow, d)
            torch._foreach_add_(shadow, current, alpha=1.0 - d)
        c = self.cfg
        if (
            self.use_swa
            and lr_scale < c.swa_start_frac
            and self._swa_due(step, elapsed_ms, max_wallclock_ms)
        ):
            self.swa_last_step = step
            if not self.swa_sum:
                self.swa_sum = {
                    k: torch.zeros_like(t) for k, t in zip(self.keys, current, strict=True)
                }
            torch._foreach_add_([self.swa_sum[k] for k in self.keys], current)
            self.swa_count += 1

    def _swa_due(self, step: int, elapsed_ms: float, max_wallclock_ms: float | None) -> bool:
        c = self.cfg
        if c.swa_every_frac <= 0:
            return step % max(c.swa_every, 1) == 0  # the records' rule
        n = expected_steps(step, elapsed_ms, c.iterations, max_wallclock_ms)
        return step - self.swa_last_step >= max(round(c.swa_every_frac * n), 1)

    def swa_mean(self) -> dict[str, torch.Tensor]:
        return {k: v / self.swa_count for k, v in self.swa_sum.items()}

    def averaged_state(self) -> tuple[dict[str, torch.Tensor] | None, str]:
        """The fp32 weights to load (None: keep the raw weights) and a line saying which."""
        use_swa = self.use_swa and self.swa_count > 0
        note = ""
        if self.use_swa and not use_swa:
            note = (
                f"; SWA took no snapshot (LR scale never fell below swa_start_frac="
                f"{self.cfg.swa_start_frac} on a multiple of swa_every={self.cfg.swa_every}; "
                "train.swa_every_frac sets the interval relative to the run)"
            )
            warnings.warn("SWA enabled but no snapshot was taken" + note, stacklevel=2)
        if self.use_ema and use_swa:
            w = self.cfg.swa_weight
            blend = {
                k: (1.0 - w) * self.ema[k] + w * (self.swa_sum[k] / self.swa_count)
                for k in self.keys
            }
            return blend, f"{1 - w:g}·EMA + {w:g}·SWA ({self.swa_count} snapshots)"
        if self.use_ema:
            return dict(self.ema), "EMA" + note
        if use_swa:
            return self.swa_mean(), f"SWA ({self.swa_count} snapshots)"
        return None, "raw weights" + note

    @torch.no_grad()
    def apply_to(self, model: nn.Module) -> str:
        """Load the averaged weights into `model`, each cast to its tensor's dtype."""
        averaged, what = self.averaged_state()
        if averaged is not None:
            state = model.state_dict()
            for k, v in averaged.items():
                state[k].copy_(v.to(state[k].dtype))
        return what

    # -- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "ema": {k: v.clone() for k, v in self.ema.items()},
            "swa_sum": {k: v.clone() for k, v in self.swa_sum.items()},
            "swa_count": self.swa_count,
            "swa_last_step": self.swa_last_step,
        }

    def load_state_dict(self, state: dict) -> None:
        # Checkpoints are read onto the CPU; the shadows live beside the weights they follow.
        def here(tensors: dict) -> dict:
            return {k: v.to(self.device, copy=True) for k, v in tensors.items()}

        self.ema = here(state.get("ema", {}))
        self.swa_sum = here(state.get("swa_sum", {}))
        self.swa_count = int(state.get("swa_count", 0))
        self.swa_last_step = int(state.get("swa_last_step", 0))
