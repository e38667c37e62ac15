"""The sequential training stream (SPEC §5.27a), split across ranks, resumable from a position.

Shards are read in sorted order and wrap around. Each micro-step takes `world · (local + 1)`
contiguous tokens; rank r keeps slice r, and inputs/targets are that slice shifted by one token.
With `grad_accum = 8 / world` the union of what all ranks read in one optimizer step is the same
token range for every world size, which is what makes a 2-process run equal a 1-process run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pgolf.data.shards import read_header, read_shard
from pgolf.errors import PgolfError


class TokenStream:
    """An endless walk through shards; its position is (shard index, offset in shard)."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)
        for p in self.paths:
            if read_header(p) == 0:
                raise PgolfError(f"{p}: empty shard in the training stream")
        self.shard_index = 0
        self.offset = 0
        self._tokens = read_shard(self.paths[0])

    def take(self, n: int) -> np.ndarray:
        pieces = []
        while n > 0:
            available = len(self._tokens) - self.offset
            if available == 0:
                self._open((self.shard_index + 1) % len(self.paths))
                continue
            k = min(n, available)
            pieces.append(np.asarray(self._tokens[self.offset : self.offset + k]))
            self.offset += k
            n -= k
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _open(self, index: int) -> None:
        self.shard_index = index
        self.offset = 0
        self._tokens = read_shard(self.paths[index])

    def state_dict(self) -> dict[str, int]:
        return {"shard_index": self.shard_index, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._open(int(state["shard_index"]))
        self.offset = int(state["offset"])


class DistributedTokenLoader:
    def __init__(self, paths: list[Path], rank: int, world_size: int, device: torch.device):
        self.stream = TokenStream(paths)
        self.rank = rank
        self.world_size = world_size
        self.device = device

    def next_batch(
        self, global_tokens: int, seq_len: int, grad_accum_steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        local_tokens = global_tokens // (self.world_size * grad_accum_steps)
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        local = torch.from_numpy(chunk[self.rank * span : (self.rank + 1) * span].astype(np.int64))
        x = local[:-1].reshape(-1, seq_len)
        y = local[1:].reshape(-1, seq_len)
        non_blocking = self.device.type == "cuda"
        return x.to(self.device, non_blocking=non_blocking), y.to(
            self.device, non_blocking=non_blocking
        )

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)
