"""Batched, distributed scoring of any tiling (SPEC §3.3, §3.5–3.6).

Each forward takes up to `batch_windows` windows, right-padded with token 0; padded and unscored
positions never enter a sum. The loss is the cross entropy of the model's full logits (a normalised
distribution over the whole vocabulary, SPEC §1.4 condition 2), divided by a temperature only when
one is set explicitly. A rank scores a contiguous share of the windows it is given and keeps
float64 sums; callers all-reduce them. Every scored range goes into a `ScoredLedger` when one is
given, which is what proves "each target exactly once" at run time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pgolf.dist import World
from pgolf.eval.bpb import BpbSums, SidecarBytes, TorchByteTables, bits_per_byte
from pgolf.eval.ledger import ScoredLedger
from pgolf.eval.score import autocast_context, rank_window_range
from pgolf.eval.windows import Tiling


def use_compile(setting: str, device: torch.device) -> bool:
    """Whether eval.compile ("auto", "on", "off") compiles on `device`.

    auto is CUDA only: at the tiny S549 shape on one CPU thread the compiled forward is 1.3× and
    the TTT step 1.5× faster, but compiling them took 212 s and 342 s, more than a CPU eval runs.
    """
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def scoring_model(model: torch.nn.Module, setting: str, device: torch.device) -> torch.nn.Module:
    """What scoring and TTT run: `model`, or it compiled (a wrapper sharing its weights)."""
    return torch.compile(model) if use_compile(setting, device) else model


def sums_from_tensor(t: torch.Tensor) -> BpbSums:
    nats, num_bytes, tokens = t.double().tolist()
    return BpbSums(nats, num_bytes, tokens)


def all_reduce_tensor(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        torch.distributed.all_reduce(t)
    return t


class DocumentSums:
    """Per-document (nats, bytes, targets), documents split at BOS (`windows.document_starts`)."""

    def __init__(self, starts: np.ndarray, device: torch.device):
        self.starts = torch.as_tensor(starts, dtype=torch.int64, device=device)
        self.table = torch.zeros(len(starts), 3, dtype=torch.float64, device=device)

    def add(self, targets: torch.Tensor, nll: torch.Tensor, nbytes: torch.Tensor) -> None:
        doc = torch.searchsorted(self.starts, targets, right=True) - 1
        ones = torch.ones_like(nll, dtype=torch.float64)
        self.table.index_add_(0, doc, torch.stack((nll.double(), nbytes.double(), ones), dim=1))

    def all_reduce(self, world: World) -> None:
        all_reduce_tensor(self.table, world)

    def summary(self) -> dict:
        """Document count and the macro average of per-document BPB (lm-eval style)."""
        nats, nbytes, tokens = self.table.cpu().numpy().T
        scored = (tokens > 0) & (nbytes > 0)
        per_doc = nats[scored] / (math.log(2) * nbytes[scored])
        return {
            "documents": int((tokens > 0).sum()),
            "macro_bpb": float(per_doc.mean()) if per_doc.size else float("nan"),
        }


@dataclass
class WindowScorer:
    """Everything a batch of windows needs; `score_range` does the work."""

    model: torch.nn.Module
    tokens: np.ndarray
    tiling: Tiling
    byte_tables: TorchByteTables | SidecarBytes
    world: World
    batch_windows: int
    temperature: float = 1.0
    # Sliding windows are almost all full length, so a fixed shape costs nothing; per-document
    # windows are mostly short and are padded only to the longest in their batch.
    pad_to_full: bool = True
    documents: DocumentSums | None = None

    def _batch(self, lo: int, hi: int):
        t = self.tiling
        starts, lengths, score_from = t.starts[lo:hi], t.lengths[lo:hi], t.score_from[lo:hi]
        width = t.seq_len if self.pad_to_full else int(lengths.max())
        offsets = np.arange(width, dtype=np.int64)[None, :]
        valid = offsets < lengths[:, None]
        pos = starts[:, None] + offsets
        x = np.where(valid, self.tokens[np.where(valid, pos, 0)], 0).astype(np.int64)
        y = np.where(valid, self.tokens[np.where(valid, pos + 1, 0)], 0).astype(np.int64)
        scored = valid & (offsets >= score_from[:, None])
        return x, y, scored, pos

    @torch.no_grad()
    def _score_batch(self, lo: int, hi: int, acc: torch.Tensor, ledger: ScoredLedger | None):
        x, y, scored, pos = self._batch(lo, hi)
        # Offsets before the batch's first scored one are context only: no logits are made there.
        first = int(self.tiling.score_from[lo:hi].min())
        y, scored, pos = y[:, first:], scored[:, first:], pos[:, first:]
        device = self.world.device
        x_t, y_t = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        mask = torch.from_numpy(scored).to(device)
        with autocast_context(device):
            logits = self.model(x_t, logits_from=first)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        # The loss of every row from `first` on is computed and unscored rows (padding; in the
        # batch holding window 0, the other windows' context) are dropped by `where`: fixed
        # shapes, no device sync per batch, which a boolean index would force on CUDA.
        nll = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), y_t.reshape(-1), reduction="none"
        ).view_as(y_t)
        # Targets sit one past their inputs; padding's positions are clamped and never summed.
        target_pos = np.minimum(pos + 1, len(self.tokens) - 1)
        nbytes = self.byte_tables.target_bytes(x_t[:, first:], y_t, target_pos)
        nats = torch.where(mask, nll.double(), 0.0).sum()
        num_bytes = torch.where(mask, nbytes, 0).sum().double()
        acc += torch.stack((nats, num_bytes, mask.sum().double()))
        if self.documents is not None:
            where = torch.from_numpy(pos[scored]).to(device)
            self.documents.add(where, nll[mask], nbytes[mask])
        if ledger is not None:
            self._record(lo, hi, ledger)

    def _record(self, lo: int, hi: int, ledger: ScoredLedger) -> None:
        first, last = self.tiling.scored_lo[lo:hi], self.tiling.scored_hi[lo:hi]
        if np.array_equal(last[:-1], first[1:]):  # the usual case: one contiguous range
            ledger.record(int(first[0]), int(last[-1]))
        else:
            for a, b in zip(first.tolist(), last.tolist(), strict=True):
                ledger.record(a, b)

    def score_range(
        self,
        first: int,
        last: int,
        ledger: ScoredLedger | None = None,
        after_batch: Callable[[torch.Tensor, int], bool] | None = None,
    ) -> tuple[torch.Tensor, bool]:
        """Score windows [first, last) split over ranks; returns this rank's sums and "stopped".

        Every rank runs the same number of iterations (some with nothing to score), so that a
        collective inside `after_batch(acc, windows_done)` lines up across ranks; it returns True
        to stop early.
        """
        was_training = self.model.training
        self.model.eval()
        acc = torch.zeros(3, dtype=torch.float64, device=self.world.device)
        total = last - first
        share = rank_window_range(total, self.world.rank, self.world.world_size)
        largest_share = -(-total // self.world.world_size)
        iterations = -(-largest_share // self.batch_windows)
        stopped = False
        try:
            for i in range(iterations):
                lo = first + share.start + i * self.batch_windows
                hi = min(lo + self.batch_windows, first + share.stop)
                if lo < hi:
                    self._score_batch(lo, hi, acc, ledger)
                stop = after_batch is not None and after_batch(acc, max(hi - lo, 0))
                if stop and i < iterations - 1:  # a stop after the last batch cuts nothing
                    stopped = True
                    break
        finally:
            self.model.train(was_training)
        return acc, stopped


def running_bpb(acc: torch.Tensor) -> float:
    nats, num_bytes, _ = acc.tolist()
    return bits_per_byte(nats, num_bytes)
