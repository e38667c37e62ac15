"""The evaluation entry point: tile, score (optionally with score-first TTT), report.

`evaluate` is what the pipeline calls on the dequantised artifact model. It returns one JSON-ready
dict: the reported numbers (for TTT: the first-pass sums s_0), coverage, the time split since
loading, the TTT settings with bpb_before/bpb_after, and the evidence pgolf.rules decides the
scoring rules from (targets scorable, targets the ledger saw scored once, what cut it short).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pgolf.dist import World
from pgolf.errors import PgolfError
from pgolf.eval.bpb import BpbSums, TorchByteTables
from pgolf.eval.budget import EvalClock
from pgolf.eval.config import EvalConfig, validate_eval_config
from pgolf.eval.ledger import ScoredLedger
from pgolf.eval.lora_ttt import LoraTTTResult, phased_lora_ttt
from pgolf.eval.score import rank_window_range
from pgolf.eval.scorer import (
    DocumentSums,
    WindowScorer,
    all_reduce_tensor,
    running_bpb,
    scoring_model,
    sums_from_tensor,
)
from pgolf.eval.ttt import TTTResult, score_first_ttt
from pgolf.eval.windows import build_tiling, document_starts
from pgolf.progress import progress_bar

# Refresh the running BPB every this many batches: reading it forces a device sync.
_POSTFIX_EVERY = 8
# Ask the (collective) budget clock every this many batches: each ask is an all-reduce and a sync.
_CAP_CHECK_EVERY = 8


def eval_window_length(cfg: EvalConfig, train_seq_len: int) -> int:
    return cfg.eval_seq_len or train_seq_len


def batch_windows(cfg: EvalConfig, seq_len: int, world: World) -> int:
    """Windows per forward per rank: the sliding count, or the baseline's token budget."""
    if cfg.eval_mode == "sliding":
        return cfg.eval_batch_windows
    # As the official eval_val (and pgolf.eval.score): VAL_BATCH_SIZE tokens over all ranks.
    return max(cfg.val_batch_tokens // (seq_len * world.world_size), 1)


def score_plain(
    scorer: WindowScorer,
    world: World,
    clock: EvalClock | None,
    progress: bool,
    desc: str,
) -> tuple[BpbSums, ScoredLedger, bool]:
    """One pass over every window, no adaptation; returns all-reduced sums, ledger, stopped."""
    tiling = scorer.tiling
    ledger = ScoredLedger(scorer.tokens)
    mine = len(rank_window_range(len(tiling), world.rank, world.world_size))
    bar = progress_bar(total=mine, desc=desc, enabled=progress and world.is_main, unit="win")
    batches = 0

    def after_batch(acc: torch.Tensor, done: int) -> bool:
        nonlocal batches
        batches += 1
        bar.update(done)
        if not bar.disable and batches % _POSTFIX_EVERY == 0:
            bar.set_postfix(bpb=f"{running_bpb(acc):.4f}")
        return clock is not None and batches % _CAP_CHECK_EVERY == 0 and clock.should_stop()

    try:
        acc, stopped = scorer.score_range(0, len(tiling), ledger, after_batch)
    finally:
        bar.close()
    ledger.merge_ranks(0, ledger.num_targets, world)
    return sums_from_tensor(all_reduce_tensor(acc, world)), ledger, stopped


def _ttt_settings(cfg: EvalConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k.startswith("ttt_")}


def evaluate(
    model: torch.nn.Module,
    tokens: np.ndarray,
    byte_tables: TorchByteTables,
    cfg: EvalConfig,
    world: World,
    *,
    train_seq_len: int,
    progress: bool = False,
    started_at: float | None = None,
) -> dict:
    """Score `tokens` with `model` as `cfg` says; `started_at` = perf_counter() at artifact load.

    The window length is `cfg.eval_seq_len`, or `train_seq_len` when that is 0; it may exceed the
    training length (RoPE tables are built for any length). The model is left as it came.
    """
    validate_eval_config(cfg)
    seq_len = eval_window_length(cfg, train_seq_len)
    if cfg.eval_mode == "sliding" and cfg.eval_stride > seq_len:
        raise PgolfError(
            f"invalid config: eval.eval_stride={cfg.eval_stride} exceeds the window {seq_len}"
        )
    tokens = np.asarray(tokens)
    clock = EvalClock(cfg.eval_time_cap_s, cfg.eval_time_cap_action, world, started_at)
    tiling = build_tiling(tokens, seq_len, cfg.eval_mode, cfg.eval_stride, cfg.per_document_reset)
    per_batch = batch_windows(cfg, seq_len, world)
    documents = None
    if cfg.per_document_sums:
        documents = DocumentSums(document_starts(tokens), world.device)
    runner = scoring_model(model, cfg.compile, world.device)

    def scorer(docs: DocumentSums | None) -> WindowScorer:
        return WindowScorer(
            runner,
            tokens,
            tiling,
            byte_tables,
            world,
            per_batch,
            cfg.temperature,
            pad_to_full=not cfg.per_document_reset,
            documents=docs,
        )

    before: BpbSums | None = None
    ttt: TTTResult | LoraTTTResult | None = None
    partial = None
    if cfg.ttt_enabled:
        if cfg.ttt_score_baseline:
            with clock.lap("baseline"):
                before, _, _ = score_plain(scorer(None), world, None, progress, "eval (no TTT)")
        if cfg.ttt_mode == "lora":
            ttt = phased_lora_ttt(
                model,
                tokens,
                byte_tables,
                cfg,
                world,
                context=seq_len,
                clock=clock,
                documents=documents,
                progress=progress,
            )
        else:
            ttt = score_first_ttt(
                model,
                tokens,
                tiling,
                byte_tables,
                cfg,
                world,
                batch_windows=per_batch,
                clock=clock,
                documents=documents,
                progress=progress,
            )
        sums, ledger, stopped = ttt.sums, ttt.ledger, ttt.stopped_by_cap
        # (ttt_max_chunks is refused with ttt_mode = "lora", whose result has no chunk list)
        if cfg.ttt_max_chunks and len(ttt.chunks) and cfg.ttt_max_chunks < ttt.num_chunks:
            partial = (
                f"ttt_max_chunks={cfg.ttt_max_chunks} of {ttt.num_chunks} chunks (PR #610 "
                "reproduction, not a full-validation score)"
            )
    else:
        with clock.lap("score"):
            sums, ledger, stopped = score_plain(
                scorer(documents), world, clock, progress, f"eval {cfg.eval_mode}"
            )
    if stopped:
        partial = f"stopped by the {cfg.eval_time_cap_s:g} s eval cap"
    if documents is not None:
        documents.all_reduce(world)
    coverage = sums.tokens / tiling.num_targets if tiling.num_targets else 0.0
    result = {
        "eval_mode": cfg.eval_mode,
        "eval_seq_len": seq_len,
        "eval_stride": cfg.eval_stride if cfg.eval_mode == "sliding" else seq_len,
        "per_document_reset": cfg.per_document_reset,
        "temperature": cfg.temperature,
        "val_loss": sums.loss,
        "val_bpb": sums.bpb,
        "val_tokens": int(sums.tokens),
        "val_bytes": int(sums.bytes),
        "val_nats": sums.nats,
        "stream_targets": tiling.num_targets,
        # the evidence of pgolf.rules' coverage and scored-once verdicts
        "scorable_targets": tiling.num_scored,
        "ledger_targets": ledger.count,
        "windows": len(tiling),
        "coverage": coverage,
        "partial": partial is not None,
        "partial_reason": partial,
        "time": clock.record(),
        "documents": documents.summary() if documents is not None else None,
        "ttt": None,
    }
    if ttt is not None:
        result["ttt"] = {
            **_ttt_settings(cfg),
            **ttt.summary(),
            "bpb_before": before.bpb if before is not None else None,
            "loss_before": before.loss if before is not None else None,
            "bpb_after": sums.bpb,  # s_0, the first-pass score: never a rescoring
            "loss_after": sums.loss,
        }
    return result
