"""The training loop: Muon + Adam under a step cap and a wall-clock budget (SPEC §4.4–4.7, §5).

One loop for CPU and CUDA, one process or many under torchrun. What counts as training time is
kept by the BudgetClock; the wall-clock stop is agreed across ranks so every rank takes the same
number of steps. The stop comes `gptq_reserve_seconds` before the cap, so that calibration which
reads training data still fits in the training budget (SPEC §1.3).

Around the step: the LR schedule (§4.5/§5.26), late QAT switched on by the LR scale (§5.12),
depth recurrence switched on by the training fraction (§5.28, when the model has it), and
EMA/SWA folded in after each step and loaded at the end (§5.5, §5.6). The final checkpoint holds
the raw weights and the averages, so a resumed run continues bit-exactly.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pgolf import rundir
from pgolf.config import RunConfig
from pgolf.data.dataset import DatasetFiles
from pgolf.dist import World, all_reduce_max
from pgolf.errors import PgolfError
from pgolf.eval.score import autocast_context
from pgolf.model.gpt import GPT
from pgolf.progress import progress_bar
from pgolf.runlog import RunLog
from pgolf.safetensors_io import save_safetensors
from pgolf.train.averaging import WeightAverager, ema_window_warning
from pgolf.train.checkpoint import load_checkpoint, save_checkpoint
from pgolf.train.clock import BudgetClock
from pgolf.train.loader import build_train_loader
from pgolf.train.optim import (
    build_optimizers,
    clip_grads,
    muon_momentum_at,
    set_lr_scale,
    set_muon_momentum,
)
from pgolf.train.qat import QAT
from pgolf.train.schedule import scheduled_lr_scale, training_frac, warmdown_scale


class _LossModule(nn.Module):
    """Routes `forward(x, y)` to `model.loss` so DDP and torch.compile see the loss as forward."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C, taken at a step boundary after a checkpoint; the message says how to resume."""


@dataclass
class TrainResult:
    steps: int
    train_time_ms: float
    tokens_seen: int
    final_train_loss: float
    stopped_by: str  # "iterations" or "wallclock"
    weights: str = "raw weights"  # what the returned model holds: raw, EMA, SWA or a blend


def grad_accum_steps(cfg: RunConfig, world_size: int) -> int:
    if cfg.train.grad_accum_steps > 0:
        return cfg.train.grad_accum_steps
    if 8 % world_size:
        raise PgolfError(
            f"world size {world_size} does not divide 8 (the upstream gradient-accumulation rule); "
            "set train.grad_accum_steps explicitly"
        )
    return 8 // world_size


def check_batch_shape(cfg: RunConfig, world_size: int, accum: int) -> None:
    t = cfg.train
    per_micro = world_size * accum * t.train_seq_len
    if t.train_batch_tokens % per_micro:
        raise PgolfError(
            f"train.train_batch_tokens={t.train_batch_tokens} is not a multiple of "
            f"world_size·grad_accum·train_seq_len = {world_size}·{accum}·{t.train_seq_len}"
        )


def effective_cap_ms(cfg: RunConfig) -> float | None:
    """Where the training loop must stop: the wall-clock cap minus the calibration reserve."""
    t = cfg.train
    if t.max_wallclock_seconds <= 0:
        return None
    if not 0 <= t.gptq_reserve_seconds < t.max_wallclock_seconds:
        raise PgolfError(
            f"train.gptq_reserve_seconds={t.gptq_reserve_seconds} must be ≥ 0 and below "
            f"train.max_wallclock_seconds={t.max_wallclock_seconds}"
        )
    return 1000.0 * (t.max_wallclock_seconds - t.gptq_reserve_seconds)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def build_model(cfg: RunConfig, device: torch.device) -> GPT:
    seed_everything(cfg.train.seed)
    return GPT(cfg.model).to(device)


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        data: DatasetFiles,
        world: World,
        run_dir: Path,
        log: RunLog,
        validate: Callable[[GPT], dict] | None = None,
    ):
        """`validate(model)` → {"val_loss", "val_bpb"} runs every `val_loss_every` steps."""
        self.cfg = cfg
        self.validate = validate
        self.world = world
        self.run_dir = Path(run_dir)
        self.log = log
        self.accum = grad_accum_steps(cfg, world.world_size)
        check_batch_shape(cfg, world.world_size, self.accum)
        self.model = build_model(cfg, world.device)
        t = cfg.train
        # Attached before compiling, so the fake-quant branch is in the graph from the first trace
        # and switching it on later needs no recompile (SPEC §5.12).
        self.qat: QAT | None = None
        if t.qat_enabled or t.late_qat_threshold > 0:
            # The quantizer's grid, floor included, so training rounds as the artifact will.
            floor = cfg.quant.scale_floor
            self.qat = QAT(self.model, t.qat_bits, t.qat_clip_percentile, floor)
            self.qat.set_active(t.qat_enabled)
        loss_module: nn.Module = _LossModule(self.model)
        if cfg.train.compile and world.is_cuda:
            loss_module = torch.compile(loss_module, dynamic=False, fullgraph=True)
        if world.distributed:
            device_ids = [world.local_rank] if world.is_cuda else None
            loss_module = DistributedDataParallel(
                loss_module, device_ids=device_ids, broadcast_buffers=False
            )
        self.loss_module = loss_module
        self.optimizers = build_optimizers(self.model, cfg.train, cfg.model.tie_embeddings)
        self.loader = build_train_loader(
            t.train_loader, data.train, world.rank, world.world_size, world.device, t.loader_seed
        )
        self.averager = WeightAverager(self.model, t)
        self.step = 0
        self.clock = BudgetClock(world.device)
        self.cap_ms = effective_cap_ms(cfg)
        self._looping: bool | None = None
        self._last_save = 0.0  # wall time (clock.now) of the last checkpoint or of the start
        self._interrupted = False  # set by the Ctrl-C handler, acted on at the next step boundary

    # -- one optimizer step ------------------------------------------------------------------
    def _train_step(self, scale: float, measure: bool = False) -> tuple[float, float | None]:
        """One optimizer step; returns the mean loss and, when `measure`, the global grad norm."""
        t = self.cfg.train
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(self.accum):
            x, y = self.loader.next_batch(t.train_batch_tokens, t.train_seq_len, self.accum)
            if isinstance(self.loss_module, DistributedDataParallel):
                # Gradients are averaged across ranks once, on the last micro-step.
                self.loss_module.require_backward_grad_sync = micro == self.accum - 1
            with autocast_context(self.world.device):
                loss = self.loss_module(x, y)
            (loss / self.accum).backward()
            total += loss.detach().float().item()
        set_muon_momentum(self.optimizers, muon_momentum_at(self.step, t))
        set_lr_scale(self.optimizers, scale)
        grad_norm = clip_grads(self.model.parameters(), t.grad_clip_norm, measure)
        for opt in self.optimizers:
            opt.step()
        return total / self.accum, grad_norm

    # -- switches driven by the schedule --------------------------------------------------------
    def _recurrence_frac(self) -> float | None:
        """The training fraction at which looping starts, or None when the model has none."""
        m = self.cfg.model
        if getattr(m, "num_loops", 0) <= 0 or not hasattr(self.model, "set_recurrence"):
            return None
        return float(getattr(m, "enable_looping_at", 0.0))

    def _set_looping(self, active: bool) -> None:
        if active != self._looping:
            self.model.set_recurrence(active)
            self._looping = active

    def _update_switches(self, scale: float, elapsed_ms: float) -> None:
        """`scale` is the warm-down scale (no LR warm-up): the switches key on the warm-down."""
        t = self.cfg.train
        if (
            self.qat is not None
            and t.late_qat_threshold > 0
            and scale < t.late_qat_threshold
            and not self.qat.active
        ):
            self.qat.set_active(True)
            self.log.text(f"late QAT on at step {self.step} (lr scale {scale:.4f})")
        start = self._recurrence_frac()
        if start is not None:
            frac = training_frac(self.step, elapsed_ms, t.iterations, self.cap_ms)
            looping = frac >= start
            if looping and not self._looping:
                self.log.text(f"depth recurrence on at step {self.step} (frac {frac:.3f})")
            self._set_looping(looping)

    # -- state -------------------------------------------------------------------------------
    def _loader_state(self):
        state = self.loader.state_dict()
        if getattr(self.loader, "rank_local_state", False) and self.world.distributed:
            # Each rank walks its own shards; the checkpoint (written by rank 0) keeps all.
            states: list = [None] * self.world.world_size
            torch.distributed.all_gather_object(states, state)
            return {"per_rank": states}
        return state

    def _load_loader_state(self, state) -> None:
        if "per_rank" in state:
            ranks = state["per_rank"]
            if len(ranks) != self.world.world_size:
                raise PgolfError(
                    f"checkpoint was written by {len(ranks)} ranks; resume with the same number "
                    f"(got {self.world.world_size}) or use another train.train_loader"
                )
            state = ranks[self.world.rank]
        self.loader.load_state_dict(state)

    def state_dict(self) -> dict:
        """Everything that decides the rest of the run; collective when the loader is per-rank."""
        return {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "loader": self._loader_state(),
            "averaging": self.averager.state_dict(),
            "qat_active": self.qat.active if self.qat is not None else False,
            "step": self.step,
            "train_ms": self.clock.train_ms,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        self._load_loader_state(state["loader"])
        if "averaging" in state:
            self.averager.load_state_dict(state["averaging"])
        if self.qat is not None:
            self.qat.set_active(bool(state.get("qat_active", self.cfg.train.qat_enabled)))
        self.step = int(state["step"])
        self.clock.train_ms = float(state["train_ms"])

    def _compile_warmup(self) -> None:
        """Run real steps to trigger compilation, then undo them completely (SPEC §4.7)."""
        steps = self.cfg.train.warmup_steps
        if steps <= 0:
            return
        initial = copy.deepcopy(self.state_dict())
        for _ in range(steps):
            self._train_step(scale=1.0)
        if self._recurrence_frac() is not None:
            # The looped forward is a second graph; compile it now too, not mid-run (S1394).
            self._set_looping(True)
            for _ in range(steps):
                self._train_step(scale=1.0)
            self._set_looping(False)
        self.load_state_dict(initial)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.log.text(f"compile warm-up: {steps} steps run and undone")

    def _checkpoint(self) -> None:
        state = self.state_dict()  # on every rank: gathering a per-rank loader is collective
        if self.world.is_main:
            save_checkpoint(self.run_dir / rundir.CHECKPOINT, state)
        self._last_save = self.clock.now()

    def _step_boundary(self) -> tuple[bool, bool]:
        """(checkpoint now, stop for Ctrl-C), the same on every rank: saving is collective and
        each rank reads its own clock and gets its own signal."""
        every = self.cfg.train.checkpoint_every_seconds
        due = every > 0 and self.clock.now() - self._last_save >= every
        code = all_reduce_max(2.0 if self._interrupted else float(due), self.world)
        return code >= 1.0, code >= 2.0

    @contextlib.contextmanager
    def _deferred_ctrl_c(self) -> Iterator[None]:
        """The first Ctrl-C stops at the next step boundary, so the checkpoint holds a whole step;
        a second one interrupts at once. Only the main thread may set signal handlers."""
        previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is not threading.main_thread() or previous is None:
            yield
            return

        def on_ctrl_c(signum, frame) -> None:
            self._interrupted = True
            signal.signal(signal.SIGINT, previous)

        signal.signal(signal.SIGINT, on_ctrl_c)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _interrupt(self) -> TrainingInterrupted:
        with self.clock.paused():
            self._checkpoint()
        message = (
            f"stopped at step {self.step}; checkpoint saved in {self.run_dir / 'checkpoint'}. "
            f"Continue with: pgolf train {self.run_dir} --resume"
        )
        self.log.text(message)
        return TrainingInterrupted(message)

    def _agreed_elapsed_ms(self) -> float:
        """Counted training time, the same number on every rank when a wall-clock cap is set.

        Everything keyed to time (LR scale, late QAT, recurrence, EMA horizon, the stop) then
        agrees across ranks: per-rank clocks would give ranks slightly different learning rates
        and let their weights drift apart. One all-reduce per step, as the stop check needs.
        """
        elapsed = self.clock.elapsed_train_ms()
        if self.cap_ms is None:
            return elapsed
        return all_reduce_max(elapsed, self.world)

    def _warn_ema_window(self, run_steps: float) -> bool:
        t = self.cfg.train
        if not (self.averager.use_ema and t.ema_decay > 0):
            return False
        message = ema_window_warning(t.ema_decay, run_steps, t.ema_max_window_frac)
        if message is None:
            return False
        warnings.warn(message, stacklevel=3)
        self.log.text("warning: " + message)
        return True

    # -- logging and periodic validation ---------------------------------------------------------
    def _is_log_step(self, step: int) -> bool:
        return step == 1 or step % max(self.cfg.train.train_log_every, 1) == 0

    def _is_validation_step(self, stop_after: int | None) -> bool:
        """Every `val_loss_every` steps, never on the last one: the pre-quant score follows it."""
        every = self.cfg.train.val_loss_every
        if self.validate is None or every <= 0 or self.step % every:
            return False
        return self.step < self.cfg.train.iterations and stop_after is None

    def _validate(self) -> None:
        """Score the raw weights on validation (every rank: the sums are all-reduced)."""
        result = self.validate(self.model)
        if self.world.is_main:
            self.log.metrics(step=self.step, eval_mode=rundir.PERIODIC_EVAL, **result)
            self.log.text(
                f"step {self.step}/{self.cfg.train.iterations} val_loss {result['val_loss']:.4f} "
                f"val_bpb {result['val_bpb']:.4f}"
            )

    # -- the loop ----------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        t = self.cfg.train
        if resume:
            self.load_state_dict(load_checkpoint(self.run_dir / rundir.CHECKPOINT))
            self.log.text(f"resumed at step {self.step} ({self.clock.train_ms:.0f} ms trained)")
            # Steps logged after that checkpoint are about to be trained again.
            self.log.drop_metrics_after(self.step)
        else:
            self._compile_warmup()
        cap_ms = self.cap_ms
        if cap_ms is not None and t.gptq_reserve_seconds > 0:
            self.log.text(
                f"calibration reserve {t.gptq_reserve_seconds:g}s: training stops at "
                f"{cap_ms / 1000:.1f}s of the {t.max_wallclock_seconds:g}s cap"
            )
        warned = self._warn_ema_window(t.iterations)
        tokens_per_step = t.train_batch_tokens
        stop_after: int | None = None
        stopped_by = "iterations"
        loss = math.nan
        bar = progress_bar(
            total=t.iterations, initial=self.step, desc="train", enabled=self.world.is_main
        )
        self._last_save = self.clock.now()  # the interval counts from here, not from __init__
        self.clock.start()
        elapsed = self._agreed_elapsed_ms()
        with self._deferred_ctrl_c():
            while self.step < t.iterations and (stop_after is None or self.step < stop_after):
                # The switches and averaging key on the warm-down alone (see warmdown_scale).
                decay = warmdown_scale(t, self.step, elapsed, cap_ms)
                scale = scheduled_lr_scale(t, self.step, elapsed, cap_ms)
                self._update_switches(decay, elapsed)
                logging = self.world.is_main and self._is_log_step(self.step + 1)
                loss, grad_norm = self._train_step(scale, measure=logging)
                self.step += 1
                elapsed = self._agreed_elapsed_ms()
                self.averager.update(self.model, self.step, decay, elapsed, cap_ms)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if logging:
                    extra = {"ema_decay": self.averager.last_decay} if self.averager.use_ema else {}
                    self.log.metrics(
                        step=self.step,
                        train_loss=loss,
                        grad_norm=grad_norm,
                        lr_scale=scale,
                        tokens_seen=self.step * tokens_per_step,
                        train_time_ms=round(elapsed, 1),
                        step_avg_ms=round(elapsed / self.step, 2),
                        **extra,
                    )
                    self.log.text(
                        f"step {self.step}/{t.iterations} train_loss {loss:.4f} "
                        f"lr_scale {scale:.4f} train_time {elapsed / 1000:.1f}s "
                        f"step_avg {elapsed / self.step:.1f}ms"
                    )
                if cap_ms is not None and stop_after is None and elapsed >= cap_ms:
                    stop_after = self.step
                    stopped_by = "wallclock"
                if self._is_validation_step(stop_after):
                    with self.clock.paused():
                        self._validate()
                save, interrupted = self._step_boundary()
                if interrupted:
                    bar.close()
                    raise self._interrupt()
                if save or (t.checkpoint_every and self.step % t.checkpoint_every == 0):
                    with self.clock.paused():
                        self._checkpoint()
        self.clock.stop()
        bar.close()
        if not warned:
            self._warn_ema_window(self.step)
        with self.clock.paused():
            # The checkpoint keeps the raw weights and the running averages: resuming continues
            # the trajectory, not the average.
            self._checkpoint()
            weights = self.averager.apply_to(self.model) if self.averager.enabled else "raw weights"
            if self.qat is not None:
                self.qat.detach()
                self.qat = None
            self.log.text(f"final weights: {weights}")
            self.save_weights()
        return TrainResult(
            steps=self.step,
            train_time_ms=self.clock.train_ms,
            tokens_seen=self.step * tokens_per_step,
            final_train_loss=loss,
            stopped_by=stopped_by,
            weights=weights,
        )

    def save_weights(self) -> Path:
        path = self.run_dir / rundir.WEIGHTS
        if self.world.is_main:
            save_safetensors(path, self.model.state_dict())
        return path
