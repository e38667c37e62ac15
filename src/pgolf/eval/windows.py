"""Window tiling as a pure function: which tokens each window reads and which targets it scores.

Indexing: a stream of N tokens has n = N − 1 targets; target t is token t + 1, predicted from
tokens[..t]. A window reads inputs tokens[start : start + length] and predicts the targets
start … start + length − 1, of which it scores only offsets [score_from, length).

- Sliding (SPEC §3.6, the corrected S1413 rule): window starts 0, s, 2s, … kept while
  `start + (T − s) < n`; the first window scores everything it predicts, every later one only its
  last predictions after T − s tokens of context. Consecutive scored ranges abut, so every target is
  scored exactly once. (The older rule rescored the tail in every truncated window; not offered.)
- Non-overlapping (SPEC §3.5): n // T disjoint windows from zero context; the last n mod T targets
  are not scored, as the official script trims them.
- Segments (per-document reset): the same sliding rule applied inside each segment of target
  indices, so no window reads tokens from two documents.

Everything here is numpy on integers and has no side effects; `Tiling` holds only arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pgolf.data.tokenizer import BOS_ID


@dataclass(frozen=True, eq=False)
class Tiling:
    """Windows over one token stream, in stream order, and the target range each one scores."""

    seq_len: int  # the window length T (inputs per window, at most)
    stride: int  # s; equal to seq_len for non-overlapping tilings
    num_targets: int  # n = len(tokens) − 1
    starts: np.ndarray  # int64 [W]: index of each window's first input token
    lengths: np.ndarray  # int64 [W]: inputs (= predictions) of each window, 1 … seq_len
    score_from: np.ndarray  # int64 [W]: first scored offset inside each window

    def __len__(self) -> int:
        return int(self.starts.size)

    @property
    def scored_lo(self) -> np.ndarray:
        """First target index each window scores."""
        return self.starts + self.score_from

    @property
    def scored_hi(self) -> np.ndarray:
        """One past the last target index each window scores."""
        return self.starts + self.lengths

    @property
    def num_scored(self) -> int:
        return int((self.lengths - self.score_from).sum())


def _check(num_targets: int, seq_len: int, stride: int) -> None:
    if num_targets < 0:
        raise ValueError(f"num_targets must be ≥ 0, got {num_targets}")
    if seq_len < 1:
        raise ValueError(f"the window length must be ≥ 1, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise ValueError(f"the stride must be in [1, window length {seq_len}], got {stride}")


def sliding_tiling(
    num_targets: int, seq_len: int, stride: int, segment_starts: np.ndarray | None = None
) -> Tiling:
    """The corrected sliding tiling of SPEC §3.6, optionally restarted at each segment start.

    `segment_starts` are target indices (sorted, starting with 0) where the context resets; a
    segment [a, b) is tiled as its own stream of b − a targets whose first input is token a.
    """
    _check(num_targets, seq_len, stride)
    if segment_starts is None:
        seg_lo = np.zeros(1 if num_targets else 0, dtype=np.int64)
    else:
        seg_lo = np.asarray(segment_starts, dtype=np.int64)
        if seg_lo.size and (seg_lo[0] != 0 or np.any(np.diff(seg_lo) <= 0)):
            raise ValueError("segment starts must begin at 0 and increase strictly")
        if seg_lo.size and seg_lo[-1] >= num_targets:
            raise ValueError("segment starts must lie inside [0, num_targets)")
    seg_len = np.diff(np.append(seg_lo, num_targets))
    context = seq_len - stride
    # Windows 0, s, 2s, … of a segment with m targets are kept while k·s + context < m, i.e.
    # ceil((m − context) / s) of them; a segment no longer than the context still gets window 0,
    # which scores all of it (the official loop would score nothing there).
    per_seg = np.where(seg_len > context, -(-(seg_len - context) // stride), 1)
    per_seg = np.where(seg_len > 0, per_seg, 0)
    seg_of = np.repeat(np.arange(seg_lo.size), per_seg)
    first_of_seg = np.repeat(np.cumsum(per_seg) - per_seg, per_seg)
    k = np.arange(seg_of.size, dtype=np.int64) - first_of_seg
    local = k * stride
    lengths = np.minimum(local + seq_len, seg_len[seg_of]) - local
    return Tiling(
        seq_len=seq_len,
        stride=stride,
        num_targets=num_targets,
        starts=seg_lo[seg_of] + local,
        lengths=lengths.astype(np.int64),
        score_from=np.where(k == 0, 0, context).astype(np.int64),
    )


def nonoverlapping_tiling(num_targets: int, seq_len: int) -> Tiling:
    """SPEC §3.5: n // T disjoint full windows; the trailing n mod T targets are not scored."""
    _check(num_targets, seq_len, seq_len)
    count = num_targets // seq_len
    return Tiling(
        seq_len=seq_len,
        stride=seq_len,
        num_targets=num_targets,
        starts=np.arange(count, dtype=np.int64) * seq_len,
        lengths=np.full(count, seq_len, dtype=np.int64),
        score_from=np.zeros(count, dtype=np.int64),
    )


def document_starts(tokens: np.ndarray, bos_id: int = BOS_ID) -> np.ndarray:
    """Target indices where a document starts: 0 and every later input position holding BOS.

    The prediction of a document's closing BOS (the next document's first token) belongs to the
    document it ends, so the segments still cover every target once.
    """
    num_targets = max(len(tokens) - 1, 0)
    if num_targets == 0:
        return np.zeros(0, dtype=np.int64)
    bos = np.flatnonzero(np.asarray(tokens[1:num_targets]) == bos_id) + 1
    return np.concatenate(([0], bos)).astype(np.int64)


def build_tiling(
    tokens: np.ndarray, seq_len: int, mode: str, stride: int, per_document_reset: bool
) -> Tiling:
    """The tiling an evaluation mode uses over `tokens`.

    With per-document reset both modes tile each document on its own, and "nonoverlapping" keeps
    each document's short tail window (stride = T) rather than dropping most short documents.
    """
    num_targets = max(len(tokens) - 1, 0)
    if mode not in ("sliding", "nonoverlapping"):
        raise ValueError(f"unknown eval mode {mode!r}; expected 'sliding' or 'nonoverlapping'")
    step = stride if mode == "sliding" else seq_len
    if per_document_reset:
        return sliding_tiling(num_targets, seq_len, step, document_starts(tokens))
    if mode == "sliding":
        return sliding_tiling(num_targets, seq_len, stride)
    return nonoverlapping_tiling(num_targets, seq_len)
