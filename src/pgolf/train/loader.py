"""Training-data loaders (SPEC §5.27), split across ranks and resumable from a saved state.

a. `DistributedTokenLoader`, the sequential stream (BASE…S1019): shards in sorted order, wrapping
   around. Each micro-step takes `world · (local + 1)` contiguous tokens; rank r keeps slice r, and
   inputs/targets are that slice shifted by one token. With `grad_accum = 8 / world` the union of
   what all ranks read in one optimizer step is the same token range for every world size, which
   is what makes a 2-process run equal a 1-process run.
b. `CoprimeStrideLoader` (S1060, PR #726): every step mixes windows from many shards; each shard is
   walked block by block with a random coprime stride, so every block is read once per epoch of
   that shard, in a scrambled order, with zero bookkeeping.
c. `ShuffledSequenceLoader` (S1394+): each rank owns its own shards and draws their T-aligned
   sequences in a random permutation, picking shards in proportion to what they have left.

All three are deterministic functions of their seed and the shard list (b and c ignore `SEED`, as
upstream does), and rank-disjoint: no two ranks read the same window in a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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


# -- shared pieces of the shuffling loaders ----------------------------------------------------
def fnv_path_seed(paths: Sequence[Path]) -> int:
    """S1060's loader seed: an FNV-1a-style hash of the shard path strings (start 0, 64-bit).

    It hashes the paths as spelled, so the walk reproduces upstream's only when the shards are
    given by the same relative path (`data/datasets/fineweb10B_sp1024/fineweb_train_*.bin`).
    """
    seed = 0
    for path in paths:
        for byte in str(path).encode():
            seed = ((seed ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return seed


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _random_phase(rng: np.random.Generator, num_tokens: int, seq_len: int) -> int:
    # A random offset in [0, T−1] so block boundaries differ between epochs (never so large
    # that no full window fits).
    max_phase = min(seq_len - 1, max(0, num_tokens - seq_len - 1))
    return int(rng.integers(max_phase + 1)) if max_phase > 0 else 0


def _window(tokens: np.ndarray, start: int, seq_len: int) -> torch.Tensor:
    return torch.from_numpy(np.array(tokens[start : start + seq_len + 1], dtype=np.int64))


def _stack_windows(
    tokens: Callable[[int], np.ndarray],
    windows: list[tuple[int, int]],
    seq_len: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.stack([_window(tokens(si), pos, seq_len) for si, pos in windows])
    non_blocking = device.type == "cuda"
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    return x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)


def _local_rows(global_tokens: int, seq_len: int, world_size: int, grad_accum_steps: int) -> int:
    local_tokens = global_tokens // (world_size * grad_accum_steps)
    if local_tokens % seq_len or local_tokens == 0:
        raise PgolfError(
            f"{local_tokens} tokens per rank and micro-step is not a positive multiple of "
            f"train_seq_len={seq_len}"
        )
    return local_tokens // seq_len


# -- b. coprime-stride multi-shard loader -------------------------------------------------------
class _ShardWalk:
    """One shard's epoch: blocks `(start + k·stride) mod count` for k = 0 … count − 1.

    A stride coprime with the block count makes that map a permutation, so each of the shard's
    T-token blocks (offset by `phase`) is read exactly once before the walk is redrawn.
    """

    __slots__ = ("phase", "count", "start", "stride", "taken")

    def __init__(self, phase: int, count: int, start: int, stride: int, taken: int = 0):
        self.phase, self.count, self.start, self.stride, self.taken = (
            phase,
            count,
            start,
            stride,
            taken,
        )

    @classmethod
    def draw(cls, rng: np.random.Generator, num_tokens: int, seq_len: int) -> _ShardWalk:
        phase = _random_phase(rng, num_tokens, seq_len)
        count = (num_tokens - 1 - phase) // seq_len
        start = int(rng.integers(count)) if count > 1 else 0
        stride = 1
        if count > 1:
            # Rejection sampling from [1, count): the draw order is upstream's, hence the loop.
            while True:
                stride = int(rng.integers(1, count))
                if math.gcd(stride, count) == 1:
                    break
        return cls(phase, count, start, stride)

    @property
    def remaining(self) -> int:
        return self.count - self.taken

    def block_start(self, k: int, seq_len: int) -> int:
        return self.phase + ((self.start + k * self.stride) % self.count) * seq_len


class CoprimeStrideLoader:
    """S1060's multi-shard loader, draw for draw (SPEC §5.27b).

    Per call (one micro-step of the whole world): `progress = min(calls/1800, 1)`; shards are
    weighted by remaining_blocks^(0.9 − 0.4·progress) (fresh shards early, then closer to uniform
    over what is left); `round(low + progress·(high − low))` shards are drawn without replacement,
    each gives one window plus a multinomial share of the rest; the windows are interleaved
    round-robin in random order, and rank r takes windows r, r + world, …. Every rank draws the
    same numbers from the same generator, so the ranks agree on the list and split it disjointly.
    """

    RAMP_CALLS = 1800  # calls over which the mix widens and the weighting flattens
    MIX_LOW, MIX_HIGH = 8, 32  # shards per call at the start / end of the ramp (× world, capped)

    def __init__(
        self,
        paths: list[Path],
        rank: int,
        world_size: int,
        device: torch.device,
        seed: int = 0,
    ):
        self.paths = list(paths)
        self.rank, self.world_size, self.device = rank, world_size, device
        self.num_tokens = [read_header(p) for p in self.paths]
        self.rng = np.random.Generator(np.random.PCG64(fnv_path_seed(self.paths) ^ seed))
        self._shards: list[np.ndarray | None] = [None] * len(self.paths)
        self.walks: dict[int, _ShardWalk] = {}
        self.calls = 0
        self.seq_len: int | None = None
        self.last_windows: list[tuple[int, int]] = []

    def _tokens(self, si: int) -> np.ndarray:
        if self._shards[si] is None:
            self._shards[si] = read_shard(self.paths[si])
        return self._shards[si]

    def _eligible(self, seq_len: int) -> list[int]:
        eligible = [i for i, n in enumerate(self.num_tokens) if (n - 1) // seq_len > 0]
        if not eligible:
            raise PgolfError(f"no training shard holds a full window of {seq_len + 1} tokens")
        return eligible

    def _take(self, si: int, count: int, seq_len: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(count):
            walk = self.walks.get(si)
            if walk is None or walk.remaining <= 0:
                walk = self.walks[si] = _ShardWalk.draw(self.rng, self.num_tokens[si], seq_len)
            out.append((si, walk.block_start(walk.taken, seq_len)))
            walk.taken += 1
        return out

    def sample_windows(self, global_rows: int, seq_len: int) -> list[tuple[int, int]]:
        """The (shard, start) windows of one micro-step for the whole world, in rank order."""
        if self.seq_len is None:
            self.seq_len = seq_len
        elif seq_len != self.seq_len:
            raise PgolfError(f"loader started with seq_len {self.seq_len}, asked for {seq_len}")
        rng = self.rng
        eligible = self._eligible(seq_len)
        progress = min(self.calls / self.RAMP_CALLS, 1.0)
        remaining = np.array(
            [
                max(self.walks[si].remaining, 1)
                if si in self.walks
                else (self.num_tokens[si] - 1) // seq_len
                for si in eligible
            ],
            dtype=np.float64,
        )
        weights = np.power(remaining, 0.9 - 0.4 * progress)
        total = float(weights.sum())
        if not np.isfinite(total) or total <= 0:
            weights, total = np.ones(len(eligible)), float(len(eligible))
        probs = weights / total
        n = len(eligible)
        low = min(max(self.MIX_LOW, self.world_size), n, global_rows)
        high = min(max(self.MIX_HIGH, 8 * self.world_size), n, global_rows)
        mix = max(1, min(int(round(low + progress * (high - low))), n, global_rows))
        picked = rng.choice(n, size=mix, replace=False, p=probs)
        counts = np.ones(mix, dtype=np.int64)
        if global_rows > mix:
            share = probs[picked] / probs[picked].sum()
            counts += rng.multinomial(global_rows - mix, share).astype(np.int64)
        order = rng.permutation(mix)
        buckets = []
        for idx in order.tolist():
            bucket = self._take(eligible[int(picked[idx])], int(counts[idx]), seq_len)
            if len(bucket) > 1:
                bucket = [bucket[k] for k in rng.permutation(len(bucket)).tolist()]
            buckets.append(bucket)
        # Round-robin in a fresh random shard order each round, taking from each bucket's end.
        windows: list[tuple[int, int]] = []
        active = [b for b in buckets if b]
        while active:
            still = []
            for k in rng.permutation(len(active)).tolist():
                bucket = active[k]
                windows.append(bucket.pop())
                if bucket:
                    still.append(bucket)
            active = still
        self.calls += 1
        return windows

    def next_batch(
        self, global_tokens: int, seq_len: int, grad_accum_steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _local_rows(global_tokens, seq_len, self.world_size, grad_accum_steps)
        windows = self.sample_windows(rows * self.world_size, seq_len)
        self.last_windows = windows[self.rank :: self.world_size]
        return _stack_windows(self._tokens, self.last_windows, seq_len, self.device)

    def state_dict(self) -> dict:
        walks = sorted(self.walks.items())
        return {
            "kind": "coprime",
            "rng": _rng_state(self.rng),
            "calls": self.calls,
            "seq_len": self.seq_len or 0,
            "walks": torch.tensor(
                [[si, w.phase, w.count, w.start, w.stride, w.taken] for si, w in walks],
                dtype=torch.int64,
            ).reshape(-1, 6),
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.calls = int(state["calls"])
        self.seq_len = int(state["seq_len"]) or None
        self.walks = {int(r[0]): _ShardWalk(*map(int, r[1:])) for r in state["walks"].tolist()}


# -- c. shuffled-sequence loader ---------------------------------------------------------------
class ShuffledSequenceLoader:
    """S1394's loader (SPEC §5.27c): rank r owns shards r, r + world, …; within each, a random
    phase and a random permutation of its T-aligned sequences; every batch row picks a shard with
    probability ∝ sequences it has left. When all are used up, every shard is reshuffled.

    Seeded by the rank alone (PCG64(rank)) as upstream; a non-zero `seed` mixes in a run seed.
    """

    def __init__(
        self,
        paths: list[Path],
        rank: int,
        world_size: int,
        device: torch.device,
        seed: int = 0,
    ):
        self.indices = list(range(rank, len(paths), world_size))
        if not self.indices:
            raise PgolfError(
                f"the shuffled loader gives each rank its own shards: {len(paths)} train shards "
                f"for {world_size} ranks leave rank {rank} with none"
            )
        self.paths = [paths[i] for i in self.indices]
        self.rank, self.world_size, self.device = rank, world_size, device
        bitgen = np.random.PCG64(rank) if seed == 0 else np.random.PCG64([seed, rank])
        self.rng = np.random.Generator(bitgen)
        self.num_tokens = [read_header(p) for p in self.paths]
        self._shards: list[np.ndarray | None] = [None] * len(self.paths)
        self.starts: list[list[int]] = []
        self.seq_len: int | None = None
        self.last_windows: list[tuple[int, int]] = []

    def _tokens(self, si: int) -> np.ndarray:
        if self._shards[si] is None:
            self._shards[si] = read_shard(self.paths[si])
        return self._shards[si]

    def _reshuffle(self, si: int) -> None:
        phase = _random_phase(self.rng, self.num_tokens[si], self.seq_len)
        count = max((self.num_tokens[si] - 1 - phase) // self.seq_len, 0)
        order = self.rng.permutation(count)
        self.starts[si] = (phase + order * self.seq_len).tolist()

    def _begin(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.starts = [[] for _ in self.paths]
        for si in range(len(self.paths)):
            self._reshuffle(si)

    def next_batch(
        self, global_tokens: int, seq_len: int, grad_accum_steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _local_rows(global_tokens, seq_len, self.world_size, grad_accum_steps)
        if self.seq_len is None:
            self._begin(seq_len)
        elif seq_len != self.seq_len:
            raise PgolfError(f"loader started with seq_len {self.seq_len}, asked for {seq_len}")
        remaining = np.array([len(s) for s in self.starts], dtype=np.float64)
        picked: list[tuple[int, int]] = []
        for _ in range(rows):
            total = remaining.sum()
            if total <= 0:
                for si in range(len(self.paths)):
                    self._reshuffle(si)
                remaining = np.array([len(s) for s in self.starts], dtype=np.float64)
                total = remaining.sum()
                if total <= 0:
                    raise PgolfError(f"no shard of rank {self.rank} holds a full window")
            si = int(self.rng.choice(len(self.paths), p=remaining / total))
            picked.append((si, self.starts[si].pop()))
            remaining[si] -= 1
        self.last_windows = [(self.indices[si], pos) for si, pos in picked]
        return _stack_windows(self._tokens, picked, seq_len, self.device)

    # Each rank's position differs, so a checkpoint must keep every rank's (see the trainer).
    rank_local_state = True

    def state_dict(self) -> dict:
        return {
            "kind": "shuffled",
            "rng": _rng_state(self.rng),
            "seq_len": self.seq_len or 0,
            "starts": [torch.tensor(s, dtype=torch.int64) for s in self.starts],
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.seq_len = int(state["seq_len"]) or None
        self.starts = [t.tolist() for t in state["starts"]]


LOADERS = {
    "sequential": DistributedTokenLoader,
    "coprime": CoprimeStrideLoader,
    "shuffled": ShuffledSequenceLoader,
}


def build_train_loader(
    kind: str,
    paths: list[Path],
    rank: int,
    world_size: int,
    device: torch.device,
    seed: int = 0,
):
    if kind not in LOADERS:
        raise PgolfError(f"unknown train.train_loader {kind!r}; expected one of {sorted(LOADERS)}")
    if kind == "sequential":
        return DistributedTokenLoader(paths, rank, world_size, device)
    return LOADERS[kind](paths, rank, world_size, device, seed=seed)
