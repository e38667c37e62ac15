"""The ledger of scored targets: the one gate between the validation stream and TTT training.

SPEC §1.4 allows test-time training only on validation tokens that have already been scored, and
each token must be scored exactly once. Rather than trusting loop order, the ledger records every
scored target index and is the only way training code obtains tokens: `release(lo, hi)` returns
the tokens needed to train on targets [lo, hi) as `ScoredTokens`, and raises `LedgerViolation` if
any of them (or the input token before them) has not been scored yet. `record` raises if a target
is scored twice. The legal trainers (`pgolf.eval.ttt`) accept nothing but `ScoredTokens`, which
only this module can make, so the type itself carries the proof that the tokens were scored.

Document-level evaluation (per-document windows, per-document LoRA TTT) is given the document
partition up front, as `windows.document_starts` computes it from the BOS positions: the BOS that
opens a document is then known input, not a prediction, so training on a document may start at
its BOS before the previous document's last target (that same BOS) has been scored.
"""

from __future__ import annotations

import numpy as np
import torch

from pgolf.dist import World


class LedgerViolation(RuntimeError):
    """An evaluation broke score-first or score-once: a bug, never a user error."""


# Held only by this module: a `ScoredTokens` is made by a ledger's release, or from other ones.
_MINT = object()


class ScoredTokens:
    """Validation tokens released for training: every target among them has been scored.

    Slicing keeps that true (a sub-span's targets are a subset), and so does joining spans: the
    token a join makes a target was itself scored as one, or opens a document, before its span
    was released. The array is read-only, so no trainer can plant a token into it.
    """

    __slots__ = ("_tokens",)

    def __init__(self, tokens: np.ndarray, mint: object = None):
        if mint is not _MINT:
            raise LedgerViolation("ScoredTokens come only from ScoredLedger.release")
        tokens.setflags(write=False)
        self._tokens = tokens

    @property
    def tokens(self) -> np.ndarray:
        return self._tokens

    @property
    def num_targets(self) -> int:
        return max(len(self._tokens) - 1, 0)

    def __getitem__(self, span: slice) -> ScoredTokens:
        if not isinstance(span, slice) or span.step not in (None, 1):
            raise TypeError("ScoredTokens take a contiguous slice; read .tokens for values")
        return ScoredTokens(self._tokens[span], _MINT)

    @staticmethod
    def concat(parts: list[ScoredTokens]) -> ScoredTokens:
        return ScoredTokens(np.concatenate([require_scored(p).tokens for p in parts]), _MINT)


def require_scored(data: object) -> ScoredTokens:
    """`data` itself if the ledger released it; anything else is a bug that could train unscored."""
    if not isinstance(data, ScoredTokens):
        raise LedgerViolation(
            f"training was handed {type(data).__name__}, not tokens the ledger released"
        )
    return data


class ScoredLedger:
    """One flag per target of the stream: scored or not (a bitmap: 62 MB for the full val set)."""

    def __init__(self, tokens: np.ndarray, document_starts: np.ndarray | None = None):
        self._tokens = tokens
        self.num_targets = max(len(tokens) - 1, 0)
        self._scored = np.zeros(self.num_targets, dtype=bool)
        starts = () if document_starts is None else np.asarray(document_starts).tolist()
        self._document_starts = frozenset(starts)

    def _check_range(self, lo: int, hi: int) -> None:
        if not 0 <= lo <= hi <= self.num_targets:
            raise ValueError(f"target range [{lo}, {hi}) outside [0, {self.num_targets})")

    def record(self, lo: int, hi: int) -> None:
        """Mark targets [lo, hi) as scored by this process."""
        self._check_range(lo, hi)
        seen = self._scored[lo:hi]
        if seen.any():
            first = lo + int(np.argmax(seen))
            raise LedgerViolation(f"target {first} scored a second time (range [{lo}, {hi}))")
        self._scored[lo:hi] = True

    def merge_ranks(self, lo: int, hi: int, world: World) -> None:
        """Make [lo, hi) the union of what every rank scored there (a collective call).

        Each rank records only the windows it scored; training on a chunk needs to know the chunk
        was scored as a whole. A sum above 1 means two ranks scored the same target.
        """
        self._check_range(lo, hi)
        if not world.distributed:
            return
        dtype = torch.uint8 if world.world_size < 256 else torch.int32
        counts = torch.from_numpy(self._scored[lo:hi].astype(np.uint8)).to(world.device, dtype)
        torch.distributed.all_reduce(counts)
        merged = counts.cpu().numpy()
        if (merged > 1).any():
            first = lo + int(np.argmax(merged > 1))
            raise LedgerViolation(f"target {first} scored by more than one rank")
        self._scored[lo:hi] = merged > 0

    def is_scored(self, lo: int, hi: int) -> bool:
        self._check_range(lo, hi)
        return bool(self._scored[lo:hi].all())

    @property
    def count(self) -> int:
        return int(self._scored.sum())

    def release(self, lo: int, hi: int) -> ScoredTokens:
        """Tokens lo … hi (hi − lo + 1 of them) for training on targets [lo, hi), if all scored.

        Input token lo is itself target lo − 1 (unless lo = 0), so it must have been scored too,
        unless lo opens a document of the partition given at construction.
        """
        self._check_range(lo, hi)
        first_needed = lo if lo in self._document_starts else max(lo - 1, 0)
        needed = self._scored[first_needed:hi]
        if not needed.all():
            first = first_needed + int(np.argmin(needed))
            raise LedgerViolation(
                f"training on targets [{lo}, {hi}) would use target {first}, not yet scored"
            )
        return ScoredTokens(np.asarray(self._tokens[lo : hi + 1], dtype=np.int64), _MINT)
