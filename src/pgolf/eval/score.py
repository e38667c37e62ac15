"""Non-overlapping evaluation (SPEC §3.5): every target scored once, each window from zero context.

The validation stream is trimmed to `((n − 1) // T) · T + 1` tokens and cut into disjoint windows
of T inputs; window k predicts tokens k·T+1 … (k+1)·T. Windows are split contiguously across ranks,
each rank sums (nats, bytes, count) in float64, and the sums are all-reduced.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from pgolf.dist import World
from pgolf.eval.bpb import BpbSums, SidecarBytes, TorchByteTables


def num_nonoverlapping_windows(num_tokens: int, seq_len: int) -> int:
    return max(num_tokens - 1, 0) // seq_len


def rank_window_range(num_windows: int, rank: int, world_size: int) -> range:
    """The contiguous share of windows rank `rank` scores (as the official `seq_start`)."""
    return range(num_windows * rank // world_size, num_windows * (rank + 1) // world_size)


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU (CPU bf16 is emulated and much slower)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def score_nonoverlapping(
    model: torch.nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    batch_tokens: int,
    byte_tables: TorchByteTables | SidecarBytes,
    world: World,
) -> BpbSums:
    """Score the stream in disjoint windows of `seq_len`; returns the all-reduced sums."""
    was_training = model.training
    model.eval()
    windows = rank_window_range(
        num_nonoverlapping_windows(len(tokens), seq_len), world.rank, world.world_size
    )
    per_batch = max(batch_tokens // (seq_len * world.world_size), 1)
    sums = BpbSums()
    for first in range(windows.start, windows.stop, per_batch):
        last = min(first + per_batch, windows.stop)
        chunk = np.asarray(tokens[first * seq_len : last * seq_len + 1], dtype=np.int64)
        local = torch.from_numpy(chunk).to(world.device)
        x = local[:-1].reshape(-1, seq_len)
        y = local[1:].reshape(-1, seq_len)
        with autocast_context(world.device):
            nll = model.loss(x, y, reduction="none")
        positions = np.arange(first * seq_len + 1, last * seq_len + 1).reshape(-1, seq_len)
        sums.add(
            nats=nll.double().sum().item(),
            num_bytes=byte_tables.target_bytes(x, y, positions).sum().item(),
            tokens=y.numel(),
        )
    model.train(was_training)
    return sums.all_reduce()
