"""The training loop: Muon + Adam under a step cap and a wall-clock budget (SPEC §4.4–4.7).

One loop for CPU and CUDA, one process or many under torchrun. What counts as training time is
kept by the BudgetClock; the wall-clock stop is agreed across ranks so every rank takes the same
number of steps.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pgolf.config import RunConfig
from pgolf.data.dataset import DatasetFiles
from pgolf.dist import World, all_reduce_max
from pgolf.errors import PgolfError
from pgolf.eval.score import autocast_context
from pgolf.fileio import atomic_write
from pgolf.model.gpt import GPT
from pgolf.progress import progress_bar
from pgolf.runlog import RunLog
from pgolf.train.checkpoint import load_checkpoint, save_checkpoint
from pgolf.train.clock import BudgetClock
from pgolf.train.loader import DistributedTokenLoader
from pgolf.train.optim import (
    build_optimizers,
    maybe_clip_grads,
    muon_momentum_at,
    set_lr_scale,
    set_muon_momentum,
)
from pgolf.train.schedule import lr_scale

WEIGHTS_NAME = "model.safetensors"


class _LossModule(nn.Module):
    """Routes `forward(x, y)` to `model.loss` so DDP and torch.compile see the loss as forward."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y)


@dataclass
class TrainResult:
    steps: int
    train_time_ms: float
    tokens_seen: int
    final_train_loss: float
    stopped_by: str  # "iterations" or "wallclock"


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


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def build_model(cfg: RunConfig, device: torch.device) -> GPT:
    seed_everything(cfg.train.seed)
    return GPT(cfg.model).to(device)


class Trainer:
    def __init__(
        self, cfg: RunConfig, data: DatasetFiles, world: World, run_dir: Path, log: RunLog
    ):
        self.cfg = cfg
        self.world = world
        self.run_dir = Path(run_dir)
        self.log = log
        self.accum = grad_accum_steps(cfg, world.world_size)
        check_batch_shape(cfg, world.world_size, self.accum)
        self.model = build_model(cfg, world.device)
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
        self.loader = DistributedTokenLoader(data.train, world.rank, world.world_size, world.device)
        self.step = 0
        self.clock = BudgetClock(world.device)

    # -- one optimizer step ------------------------------------------------------------------
    def _train_step(self, scale: float) -> float:
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
        maybe_clip_grads(self.model.parameters(), t.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
        return total / self.accum

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "loader": self.loader.state_dict(),
            "step": self.step,
            "train_ms": self.clock.train_ms,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        self.loader.load_state_dict(state["loader"])
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
        self.load_state_dict(initial)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.log.text(f"compile warm-up: {steps} steps run and undone")

    def _checkpoint(self) -> None:
        if self.world.is_main:
            save_checkpoint(self.run_dir / "checkpoint", self.state_dict())

    # -- the loop ----------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        t = self.cfg.train
        if resume:
            self.load_state_dict(load_checkpoint(self.run_dir / "checkpoint"))
            self.log.text(f"resumed at step {self.step} ({self.clock.train_ms:.0f} ms trained)")
        else:
            self._compile_warmup()
        cap_ms = 1000.0 * t.max_wallclock_seconds if t.max_wallclock_seconds > 0 else None
        tokens_per_step = t.train_batch_tokens
        stop_after: int | None = None
        stopped_by = "iterations"
        loss = math.nan
        bar = progress_bar(
            total=t.iterations, initial=self.step, desc="train", enabled=self.world.is_main
        )
        self.clock.start()
        while self.step < t.iterations and (stop_after is None or self.step < stop_after):
            scale = lr_scale(
                self.step, self.clock.elapsed_train_ms(), t.iterations, t.warmdown_iters, cap_ms
            )
            loss = self._train_step(scale)
            self.step += 1
            elapsed = self.clock.elapsed_train_ms()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if self.world.is_main and (
                self.step % max(t.train_log_every, 1) == 0 or self.step == 1
            ):
                self.log.metrics(
                    step=self.step,
                    train_loss=loss,
                    lr_scale=scale,
                    tokens_seen=self.step * tokens_per_step,
                    train_time_ms=round(elapsed, 1),
                    step_avg_ms=round(elapsed / self.step, 2),
                )
                self.log.text(
                    f"step {self.step}/{t.iterations} train_loss {loss:.4f} lr_scale {scale:.4f} "
                    f"train_time {elapsed / 1000:.1f}s step_avg {elapsed / self.step:.1f}ms"
                )
            reached_cap = cap_ms is not None and stop_after is None and elapsed >= cap_ms
            if (
                cap_ms is not None
                and stop_after is None
                and all_reduce_max(reached_cap, self.world)
            ):
                stop_after = self.step
                stopped_by = "wallclock"
            if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                with self.clock.paused():
                    self._checkpoint()
        self.clock.stop()
        bar.close()
        with self.clock.paused():
            self._checkpoint()
            self.save_weights()
        return TrainResult(
            steps=self.step,
            train_time_ms=self.clock.train_ms,
            tokens_seen=self.step * tokens_per_step,
            final_train_loss=loss,
            stopped_by=stopped_by,
        )

    def save_weights(self) -> Path:
        path = self.run_dir / WEIGHTS_NAME
        if self.world.is_main:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            with atomic_write(path) as f:
                f.write(safetensors_bytes(tensors))
        return path
