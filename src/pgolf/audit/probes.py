"""Dynamic probes of SPEC §1.4 C1, C3 and C4 on the artifact model: run it, do not read its
source. C2, which the run itself also checks, is pgolf.eval.normalisation.

Each probe returns `{"ok": bool, "detail": str, ...numbers}`. A probe that could not show the
property it tests (for example a model whose outputs never change) says so rather than passing.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from pgolf.dist import World
from pgolf.eval.bpb import TorchByteTables
from pgolf.eval.budget import EvalClock
from pgolf.eval.config import EvalConfig
from pgolf.eval.normalisation import eval_logits
from pgolf.eval.ttt import score_first_ttt
from pgolf.eval.windows import build_tiling

# fp32 log-probabilities of a causal model are bitwise equal on a shared prefix on CPU; bf16
# autocast on CUDA can change kernel choice with sequence content, so leave room for that.
CAUSAL_TOL = 1e-4
# The poison probe's prefix: three chunks of at most this many targets keep it to seconds on a
# GPU for the record-size models while still crossing two chunk boundaries.
POISON_MAX_CHUNK = 8192


def _random_other_tokens(x: torch.Tensor, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Tokens guaranteed to differ from `x` elementwise (a shift by 1 … vocab−1)."""
    shift = torch.randint(1, vocab, x.shape, generator=gen)
    return (x + shift.to(x.device)) % vocab


def causality_probe(
    model: torch.nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    temperature: float,
    vocab: int,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """C1: replace every token from position p on; positions < p must keep their distribution.

    Three cut points, each checked against the unperturbed forward. The later positions must
    move, otherwise the probe proved nothing (a constant model is trivially "causal").
    """
    length = min(seq_len, len(tokens))
    x = torch.as_tensor(np.asarray(tokens[:length], dtype=np.int64), device=device)[None]
    gen = torch.Generator().manual_seed(seed)
    base = torch.log_softmax(eval_logits(model, x) / temperature, dim=-1)
    worst_past, least_future = 0.0, float("inf")
    cuts = sorted({max(1, length * k // 4) for k in (1, 2, 3)})
    for p in cuts:
        poked = x.clone()
        poked[:, p:] = _random_other_tokens(x[:, p:], vocab, gen)
        moved = torch.log_softmax(eval_logits(model, poked) / temperature, dim=-1)
        worst_past = max(worst_past, float((moved[:, :p] - base[:, :p]).abs().max()))
        least_future = min(least_future, float((moved[:, p:] - base[:, p:]).abs().max()))
    ok = worst_past <= CAUSAL_TOL and least_future > CAUSAL_TOL
    detail = (
        f"future tokens replaced at positions {cuts} of {length}: earlier log-probs moved by "
        f"≤ {worst_past:.2e} (tolerance {CAUSAL_TOL:g}); later ones by ≥ {least_future:.2e}"
    )
    if least_future <= CAUSAL_TOL:
        detail += " — the model ignores its input, so the probe shows nothing"
    return {"ok": ok, "detail": detail, "max_past_shift": worst_past}


def poison_probe(
    model: torch.nn.Module,
    tokens: np.ndarray,
    cfg: EvalConfig,
    seq_len: int,
    byte_tables: TorchByteTables,
    world: World,
    batch_windows: int,
    seed: int = 0,
) -> dict:
    """C3/C4: run score-first TTT twice on a 3-chunk prefix, the second time with chunk 2
    replaced by random tokens; the first-pass losses of chunks 0 and 1 must not change.

    The run's TTT settings are used as they are, except that chunks are shrunk (to a multiple
    of the stride) when three of the run's chunks would not fit the probe prefix.
    """
    step = cfg.eval_stride if cfg.eval_mode == "sliding" else seq_len
    available = max(len(tokens) - 1, 0)
    chunk = min(cfg.ttt_chunk_tokens, POISON_MAX_CHUNK, available // 3)
    chunk = max((chunk // step) * step, step)
    if 3 * chunk > available:
        return {"ok": False, "detail": f"validation stream too short for a 3-chunk probe ({chunk})"}
    probe_cfg = dataclasses.replace(
        cfg,
        ttt_enabled=True,
        ttt_chunk_tokens=chunk,
        ttt_max_chunks=0,
        ttt_score_baseline=False,
        eval_time_cap_s=0.0,
    )
    clean = np.asarray(tokens[: 3 * chunk + 1], dtype=np.int64).copy()
    tiling = build_tiling(clean, seq_len, cfg.eval_mode, cfg.eval_stride, cfg.per_document_reset)

    def first_pass(stream: np.ndarray):
        # a copy per pass: TTT adapts the weights and its optimizer state must start fresh
        probe_model = copy.deepcopy(model)
        clock = EvalClock(0.0, "warn", world)
        return score_first_ttt(
            probe_model,
            stream,
            tiling,
            byte_tables,
            probe_cfg,
            world,
            batch_windows=batch_windows,
            clock=clock,
        )

    before = first_pass(clean)
    chunks = before.chunks
    if len(chunks) < 3:
        return {"ok": False, "detail": f"the probe prefix made {len(chunks)} chunks, not 3"}
    poisoned = clean.copy()
    # the last token chunk 1 reads is its last target, token index hi (target i = token i+1)
    first_poison = chunks[1].hi + 1
    gen = np.random.default_rng(seed)
    vocab = int(byte_tables.base_bytes.numel())
    poisoned[first_poison:] = (
        clean[first_poison:] + gen.integers(1, vocab, len(clean) - first_poison)
    ) % vocab
    after = first_pass(poisoned)
    shift = max(
        abs(a.nats - b.nats) for a, b in zip(before.chunks[:2], after.chunks[:2], strict=True)
    )
    poison_seen = abs(before.chunks[2].nats - after.chunks[2].nats) > 0
    trained = sum(c.trained for c in before.chunks)
    once = before.ledger.count == tiling.num_scored == int(before.sums.tokens)
    # CPU is deterministic (exactly 0); CUDA reductions may reorder, hence a relative epsilon
    tol = 1e-6 * max(abs(chunks[0].nats) + abs(chunks[1].nats), 1.0) if world.is_cuda else 0.0
    ok = shift <= tol and poison_seen and once
    detail = (
        f"{len(chunks)} chunks of {chunk} targets, {trained} trained: poisoning chunk 2 moved "
        f"s_0 of chunks 0–1 by {shift:.3g} nats (tolerance {tol:g}); ledger scored "
        f"{before.ledger.count:,} of {tiling.num_scored:,} targets once each"
    )
    if not poison_seen:
        detail += "; the poison did not change chunk 2's own loss, so the probe shows nothing"
    return {"ok": ok, "detail": detail, "prefix_shift_nats": shift, "chunks_trained": trained}
