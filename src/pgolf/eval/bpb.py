"""Exact bits-per-byte arithmetic (SPEC §3.2–3.3).

A scored prediction of target `y` after previous token `p` covers
`base_bytes[y] + (has_leading_space[y] and not is_boundary[p])` bytes of normalised text.
A CaseOps dataset instead gives each target's bytes in a sidecar (`SidecarBytes`).
Losses are summed in nats in float64; `bpb = nats / (ln 2 · bytes)`. Sums, never means, are what
ranks all-reduce, so any split of the stream gives the same number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pgolf.data.tokenizer import ByteTables


def target_bytes(prev, target, tables: ByteTables):
    """Bytes covered by each prediction `prev → target` (numpy arrays in, int64 numpy array out)."""
    prev = np.asarray(prev, dtype=np.int64)
    target = np.asarray(target, dtype=np.int64)
    space = tables.has_leading_space[target] & ~tables.is_boundary[prev]
    return tables.base_bytes[target].astype(np.int64) + space.astype(np.int64)


class TorchByteTables:
    """The byte tables as device tensors, for counting bytes inside the evaluation loop."""

    def __init__(self, tables: ByteTables, device: torch.device | str = "cpu"):
        self.base_bytes = torch.as_tensor(tables.base_bytes.astype(np.int64), device=device)
        self.has_leading_space = torch.as_tensor(tables.has_leading_space, device=device)
        self.is_boundary = torch.as_tensor(tables.is_boundary, device=device)

    def target_bytes(
        self, prev: torch.Tensor, target: torch.Tensor, positions: np.ndarray | None = None
    ) -> torch.Tensor:
        """Bytes of each prediction; the tokens alone decide them, so `positions` is unused."""
        space = self.has_leading_space[target] & ~self.is_boundary[prev]
        return self.base_bytes[target] + space.long()


class SidecarBytes:
    """Byte counts per val token from a CaseOps byte sidecar, in place of the tokenizer's tables.

    `counts[i]` is the number of original UTF-8 bytes token i of the val stream stands for (0 for
    BOS and the case operators), so a prediction's bytes are its target's entry, found by the
    target's position in the stream (as the TOP record's eval reads its sidecar).
    """

    def __init__(self, counts: np.ndarray, device: torch.device | str = "cpu"):
        self.counts = np.asarray(counts)
        self.device = device

    def target_bytes(
        self, prev: torch.Tensor, target: torch.Tensor, positions: np.ndarray
    ) -> torch.Tensor:
        nbytes = self.counts[np.asarray(positions)].astype(np.int64)
        return torch.from_numpy(nbytes).to(self.device)


@dataclass
class BpbSums:
    """The three float64 accumulators of a score: Σ NLL (nats), Σ bytes, number of predictions."""

    nats: float = 0.0
    bytes: float = 0.0
    tokens: float = 0.0

    def add(self, nats: float, num_bytes: float, tokens: float) -> None:
        self.nats += float(nats)
        self.bytes += float(num_bytes)
        self.tokens += float(tokens)

    def __add__(self, other: BpbSums) -> BpbSums:
        return BpbSums(self.nats + other.nats, self.bytes + other.bytes, self.tokens + other.tokens)

    def all_reduce(self) -> BpbSums:
        """Sum over ranks (a no-op outside torch.distributed)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return BpbSums(self.nats, self.bytes, self.tokens)
        backend = torch.distributed.get_backend()
        device = "cuda" if backend == "nccl" else "cpu"
        t = torch.tensor([self.nats, self.bytes, self.tokens], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        nats, num_bytes, tokens = t.tolist()
        return BpbSums(nats, num_bytes, tokens)

    @property
    def loss(self) -> float:
        """Mean NLL in nats per token (`val_loss`)."""
        return self.nats / self.tokens if self.tokens else float("nan")

    @property
    def bpb(self) -> float:
        return bits_per_byte(self.nats, self.bytes)


def bits_per_byte(nats: float, num_bytes: float) -> float:
    return nats / (math.log(2) * num_bytes) if num_bytes else float("nan")
