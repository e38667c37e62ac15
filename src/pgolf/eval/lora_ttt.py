"""Per-document LoRA TTT with phased global SGD (SPEC §5.29 "Later refinements", §5.31).

TOP's evaluation, score-first at two levels:
- **Documents** (split at BOS, `windows.document_starts`) go through in batches, each document
  with its own low-rank adapters (`pgolf.model.lora`), fresh at the document's start. A document
  is cut into chunks of `ttt_lora_chunk` targets; each chunk is scored with the adapters as they
  stand (its window: up to `ttt_lora_context` tokens of the same document ending at the chunk),
  its targets enter the ledger, and then one Adam step trains the adapters on exactly that chunk,
  unless it is the document's last. The step reuses the scoring forward: before the backward,
  the chunk's tokens are taken from the ledger (which raises unless they were scored) and must
  equal what the forward read.
- **Phases**: the first `ttt_prefix_docs` documents are scored in `ttt_phases` groups; after each,
  the model's own weights take §5.29's chunked SGD over every document scored so far, their
  tokens again released by the ledger. Later documents are scored by the updated model.

The reported score is the first pass s_0. Adapters are never shared between documents (unless
`ttt_lora_warm_start_a`, TOP's carry-over of A), and rows of a batch are independent (per-row
adapters, element-wise Adam), so with no phases a document scores as it would alone.

Order: `stream` takes documents in stream order, so every global update uses only tokens before
the ones it later helps score (condition 1 of SPEC §1.4 as well as 3). `length` is TOP's: sorted
by length, the longest batches first (less padding; its phases train on the longest documents),
which lets a document be scored after, and by a model trained on, documents later in the stream;
every update still uses only scored tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pgolf.dist import World
from pgolf.eval.bpb import BpbSums, SidecarBytes, TorchByteTables
from pgolf.eval.budget import EvalClock
from pgolf.eval.config import EvalConfig
from pgolf.eval.ledger import LedgerViolation, ScoredLedger, ScoredTokens
from pgolf.eval.score import autocast_context
from pgolf.eval.scorer import DocumentSums, all_reduce_tensor, sums_from_tensor
from pgolf.eval.ttt import (
    chunk_lr,
    cut_sequences,
    only_these_trainable,
    set_group_lrs,
    step_plan,
    train_step,
    ttt_optimizer,
    ttt_params,
    weights_restored,
)
from pgolf.eval.windows import document_starts
from pgolf.model.lora import LoRAAdapters, parse_targets
from pgolf.progress import progress_bar


# -- the schedule: documents, batches, phase points -------------------------------------------
def document_spans(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each document's target range [start, end): together every target exactly once."""
    starts = document_starts(tokens)
    ends = np.append(starts[1:], max(len(tokens) - 1, 0)).astype(np.int64)
    return starts, ends


def batch_schedule(lengths: np.ndarray, batch_docs: int, order: str) -> list[np.ndarray]:
    """Document indices, batch by batch, in processing order."""
    if order == "stream":
        ids = np.arange(len(lengths))
        return [ids[i : i + batch_docs] for i in range(0, len(ids), batch_docs)]
    by_length = np.argsort(lengths, kind="stable")
    batches = [by_length[i : i + batch_docs] for i in range(0, len(by_length), batch_docs)]
    return sorted(batches, key=lambda b: -int(lengths[b].max()))  # stable: ties keep order


def phase_points(batches: list[np.ndarray], prefix_docs: int, phases: int) -> list[int]:
    """Batches after which a global phase runs: the first to reach each k/phases of the prefix."""
    if phases <= 0 or not batches:
        return []
    done = np.cumsum([len(b) for b in batches])
    prefix = min(prefix_docs, int(done[-1]))
    if prefix <= 0:
        return []
    bounds = [max(prefix * (k + 1) // phases, 1) for k in range(phases)]
    return sorted({int(np.searchsorted(done, b, side="left")) for b in bounds})


# -- results ---------------------------------------------------------------------------------
@dataclass
class LoraTTTResult:
    sums: BpbSums  # s_0, all ranks
    ledger: ScoredLedger
    documents: int
    batches: int
    chunks_scored: int = 0
    chunks_trained: int = 0
    adapter_params: int = 0  # per document
    trainable_params: int = 0  # of the model, in the global phases
    phases: list[dict] = field(default_factory=list)
    stopped_by_cap: bool = False

    def summary(self) -> dict:
        return {
            "mode": "lora",
            "documents": self.documents,
            "doc_batches": self.batches,
            "chunks_scored": self.chunks_scored,
            "chunks_trained": self.chunks_trained,
            "adapter_params_per_doc": self.adapter_params,
            "trainable_params": self.trainable_params,
            "phases": self.phases,
            "stopped_by_cap": self.stopped_by_cap,
        }


# -- one batch of documents ------------------------------------------------------------------
@dataclass
class _Stream:
    """What every batch reads: the tokens, their documents, and where scores go."""

    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    ledger: ScoredLedger
    byte_tables: TorchByteTables | SidecarBytes
    documents: DocumentSums | None
    device: torch.device


def _score_and_train_batch(
    model: nn.Module,
    adapters: LoRAAdapters,
    docs: np.ndarray,
    stream: _Stream,
    cfg: EvalConfig,
    context: int,
    acc: torch.Tensor,
) -> None:
    """Every chunk of `docs`, in lockstep: score (into acc and the ledger), then one step."""
    tokens, device, chunk = stream.tokens, stream.device, cfg.ttt_lora_chunk
    starts, lengths = stream.starts[docs], stream.lengths[docs]
    chunks = -(-lengths // chunk)
    adapters.reset(keep_a=cfg.ttt_lora_warm_start_a)
    optimizer = torch.optim.AdamW(
        adapters.parameters(),
        lr=cfg.ttt_lora_lr,
        betas=(cfg.ttt_lora_beta1, cfg.ttt_lora_beta2),
        eps=1e-10,
        weight_decay=cfg.ttt_lora_weight_decay,
    )
    for ci in range(int(chunks.max())):
        rows = np.flatnonzero(ci < chunks)
        s = starts[rows]
        chunk_hi = np.minimum((ci + 1) * chunk, lengths[rows])
        win = np.maximum(chunk_hi - context, 0)  # window start, relative to the document
        width = chunk_hi - win
        scored_from = ci * chunk - win  # first scored offset in each row's window
        first = int(scored_from.min())  # no logits are made before it
        offsets = np.arange(int(width.max()), dtype=np.int64)[None, :]
        valid = offsets < width[:, None]
        pos = (s + win)[:, None] + offsets  # input positions = target indices
        x = np.where(valid, tokens[np.where(valid, pos, 0)], 0).astype(np.int64)
        y = np.where(valid, tokens[np.where(valid, pos + 1, 0)], 0).astype(np.int64)
        mask = valid & (offsets >= scored_from[:, None])
        train = ci < chunks[rows] - 1
        x_t = torch.from_numpy(x).to(device)
        adapters.use_rows(torch.from_numpy(rows).to(device))
        grad = torch.set_grad_enabled(bool(train.any()))
        with grad, adapters.attached(model), autocast_context(device):
            logits = model(x_t, logits_from=first)
        # -- score: first pass, no update has seen these targets ---------------------------
        y_t = torch.from_numpy(y[:, first:]).to(device)
        flat = logits.detach().reshape(-1, logits.size(-1)).float()
        nll = F.cross_entropy(flat, y_t.reshape(-1), reduction="none").view_as(y_t)
        target_pos = np.minimum(pos[:, first:] + 1, len(tokens) - 1)
        nbytes = stream.byte_tables.target_bytes(x_t[:, first:], y_t, target_pos)
        m = torch.from_numpy(mask[:, first:]).to(device)
        acc[:3] += torch.stack(
            (
                torch.where(m, nll.double(), 0.0).sum(),
                torch.where(m, nbytes, 0).sum().double(),
                m.sum().double(),
            )
        )
        acc[3] += len(rows)
        if stream.documents is not None:
            where = torch.from_numpy(pos[:, first:][mask[:, first:]]).to(device)
            stream.documents.add(where, nll[m], nbytes[m])
        for a, b in zip((s + ci * chunk).tolist(), (s + chunk_hi).tolist(), strict=True):
            stream.ledger.record(a, b)
        if not train.any():
            continue
        # -- train on the chunk just scored, with tokens the ledger releases -------------------
        picked = np.flatnonzero(train)
        offset = int(scored_from[picked[0]]) - first  # the same for every non-final chunk
        targets = []
        for r in picked.tolist():
            released = stream.ledger.release(int(s[r] + win[r]), int(s[r] + chunk_hi[r])).tokens
            if not np.array_equal(released[:-1], x[r, : width[r]]):
                raise LedgerViolation("the trained forward read tokens the ledger did not release")
            targets.append(released[1 + scored_from[r] :])
        y_train = torch.from_numpy(np.stack(targets)).to(device)
        z = logits[torch.from_numpy(picked).to(device), offset : offset + chunk]
        losses = F.cross_entropy(
            z.reshape(-1, z.size(-1)).float(), y_train.reshape(-1), reduction="none"
        )
        optimizer.zero_grad(set_to_none=True)
        # A sum of per-document means: each adapter sees only its own document's mean loss.
        losses.view(len(picked), chunk).mean(dim=1).sum().backward()
        optimizer.step()
        acc[4] += len(picked)


# -- a global phase --------------------------------------------------------------------------
def _global_phase(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    docs: np.ndarray,
    stream: _Stream,
    cfg: EvalConfig,
    world: World,
    seq_len: int,
) -> dict:
    """§5.29's chunked SGD over the scored documents `docs`, joined in processing order.

    A document's tokens run from its BOS to the next document's (its last target); where the
    next piece starts with that same token, it is dropped, so each scored target is trained on
    once and none is made up. Returns what the phase did.
    """
    pieces: list[ScoredTokens] = []
    for d in docs.tolist():
        lo = int(stream.starts[d])
        part = stream.ledger.release(lo, lo + int(stream.lengths[d]))
        if pieces and pieces[-1].tokens[-1] == part.tokens[0]:
            part = part[1:]
        pieces.append(part)
    data = ScoredTokens.concat(pieces)
    n = data.num_targets
    num_chunks = -(-n // cfg.ttt_chunk_tokens)
    optimizer = ttt_optimizer(model, named, cfg)
    steps = 0
    with only_these_trainable(model, named):
        for k in range(num_chunks):
            lo, hi = k * cfg.ttt_chunk_tokens, min(n, (k + 1) * cfg.ttt_chunk_tokens)
            lr = chunk_lr(cfg.ttt_lr, k, num_chunks, cfg.ttt_lr_schedule)
            seqs = [(lo + a, length) for a, length in cut_sequences(hi - lo, seq_len)]
            plan = step_plan([length for _, length in seqs], world, cfg.ttt_batch_seqs)
            for _ in range(cfg.ttt_epochs):
                for mine, global_targets in plan:
                    set_group_lrs(optimizer, lr)
                    train_step(
                        model,
                        named,
                        optimizer,
                        data,
                        [seqs[i] for i in mine],
                        global_targets,
                        world,
                        grad_clip=cfg.ttt_grad_clip,
                    )
                    steps += 1
    model.eval()
    return {"documents": len(docs), "targets": n, "chunks": num_chunks, "steps": steps}


def _merge_ranks(docs: np.ndarray, stream: _Stream, world: World) -> None:
    """Make the ledger hold every rank's scores of `docs`, each document scored by one rank.

    Merged run by run of adjacent documents: a range must not be merged twice (the second union
    would count each target once per rank), and earlier segments' documents are merged already.
    """
    if not world.distributed:
        return
    ordered = np.sort(docs)
    lo = stream.starts[ordered]
    hi = lo + stream.lengths[ordered]
    runs = np.split(np.arange(len(ordered)), np.flatnonzero(lo[1:] != hi[:-1]) + 1)
    for run in runs:
        stream.ledger.merge_ranks(int(lo[run[0]]), int(hi[run[-1]]), world)


# -- the loop --------------------------------------------------------------------------------
def phased_lora_ttt(
    model: nn.Module,
    tokens: np.ndarray,
    byte_tables: TorchByteTables | SidecarBytes,
    cfg: EvalConfig,
    world: World,
    *,
    context: int,
    clock: EvalClock,
    documents: DocumentSums | None = None,
    progress: bool = False,
    restore: bool = True,
    seed: int = 0,
) -> LoraTTTResult:
    """Score every document of `tokens` with per-document LoRA TTT and phased global SGD.

    `context` is the eval window, used when `ttt_lora_context` is 0. Batches between two phase
    points are dealt round-robin over ranks; a phase waits for all of them (ledger merge). The
    model's weights are put back as they came when `restore`; its flags always are.
    """
    seq_len = cfg.ttt_seq_len or context  # the global phases' sequences: TOP's eval length
    context = cfg.ttt_lora_context or context
    starts, ends = document_spans(tokens)
    ledger = ScoredLedger(tokens, starts)
    stream = _Stream(tokens, starts, ends - starts, ledger, byte_tables, documents, world.device)
    batches = batch_schedule(stream.lengths, cfg.ttt_lora_batch_docs, cfg.ttt_doc_order)
    points = phase_points(batches, cfg.ttt_prefix_docs, cfg.ttt_phases)
    cuts = [0, *(p + 1 for p in points), len(batches)]
    segments = list(zip(cuts[:-1], cuts[1:], strict=True))
    targets = parse_targets(cfg.ttt_lora_targets)
    named = ttt_params(model, cfg)
    result = LoraTTTResult(
        sums=BpbSums(),
        ledger=ledger,
        documents=len(starts),
        batches=len(batches),
        trainable_params=sum(p.numel() for _, p in named) if points else 0,
    )
    # nats, bytes, targets, chunks scored, chunks trained: this rank's, all-reduced at the end
    acc = torch.zeros(5, dtype=torch.float64, device=world.device)
    was_training = model.training
    bar = progress_bar(total=len(batches), desc="eval lora ttt", enabled=progress and world.is_main)
    model.eval()
    try:
        everything = list(model.parameters())
        with weights_restored(everything, restore), only_these_trainable(model, []):
            for lo, hi in segments:
                if lo == hi:
                    continue
                # Fresh adapters per phase, as TOP rebuilds its own after each global update.
                adapters = LoRAAdapters(
                    model,
                    cfg.ttt_lora_batch_docs,
                    cfg.ttt_lora_rank,
                    cfg.ttt_lora_alpha,
                    targets,
                    seed,
                ).to(world.device)
                result.adapter_params = sum(p.numel() for p in adapters.parameters()) // max(
                    cfg.ttt_lora_batch_docs, 1
                )
                for i in range(-(-(hi - lo) // world.world_size)):
                    b = lo + i * world.world_size + world.rank
                    if b < hi:
                        with clock.lap("ttt_lora"):
                            _score_and_train_batch(
                                model, adapters, batches[b], stream, cfg, context, acc
                            )
                    bar.update(min(world.world_size, hi - lo - i * world.world_size))
                    if clock.should_stop():
                        result.stopped_by_cap = True
                        break
                _merge_ranks(np.concatenate(batches[lo:hi]), stream, world)
                if result.stopped_by_cap:
                    break
                if hi - 1 in points:
                    scored = np.concatenate(batches[:hi])
                    with clock.lap("ttt_global"):
                        result.phases.append(
                            _global_phase(model, named, scored, stream, cfg, world, seq_len)
                        )
    finally:
        bar.close()
        model.train(was_training)
    all_reduce_tensor(acc, world)
    result.sums = sums_from_tensor(acc[:3])
    result.chunks_scored, result.chunks_trained = (int(v) for v in acc[3:].tolist())
    return result
