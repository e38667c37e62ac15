"""Score-first TTT (SPEC §1.4, §5.29, §9.6): legality properties first, then each seed option."""

from __future__ import annotations

import ast
import copy
import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pgolf
from pgolf.data.tokenizer import BOS_ID
from pgolf.dist import World
from pgolf.eval.budget import EvalClock
from pgolf.eval.config import EvalConfig
from pgolf.eval.ledger import LedgerViolation, ScoredLedger, ScoredTokens
from pgolf.eval.prequant import prequant_ttt
from pgolf.eval.scorer import DocumentSums
from pgolf.eval.ttt import (
    ChunkTrainer,
    IllegalEvaluationError,
    block_lr_multiplier,
    chunk_lr,
    scale_grads_by_snr_,
    score_first_ttt,
    select_ttt_params,
    snr_group_key,
    step_lr_factor,
    step_plan,
    ttt_optimizer,
    ttt_params,
)
from pgolf.eval.windows import build_tiling, document_starts
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT
from pgolf.model.roles import with_role
from tests.test_eval_scorer import byte_tables, run_eval, stream_tokens, tiny_model

CPU_WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
CHUNK = 512
N_TARGETS = 8 * CHUNK  # 8 chunks


def _ttt(model, tokens, restore=True, documents=None, **settings):
    """Score-first TTT over `tokens`: windows of 64, stride 32, chunks of 512, 2 epochs."""
    base = dict(eval_mode="sliding", eval_stride=32, ttt_enabled=True, ttt_chunk_tokens=CHUNK)
    cfg = EvalConfig(**{**base, "ttt_epochs": 2, "ttt_lr": 0.05, **settings})
    tiling = build_tiling(tokens, 64, cfg.eval_mode, cfg.eval_stride, cfg.per_document_reset)
    clock = EvalClock(0.0, "warn", CPU_WORLD)
    return score_first_ttt(
        model,
        tokens,
        tiling,
        byte_tables(),
        cfg,
        CPU_WORLD,
        batch_windows=4,
        clock=clock,
        documents=documents,
        restore=restore,
    )


def _chunk_nats(result) -> list[float]:
    return [c.nats for c in result.chunks]


# -- legality ---------------------------------------------------------------------------------
def test_ttt_never_updates_on_unscored_tokens():
    """Poison chunk k+1: the first-pass losses of chunks 0 … k must not move by a single bit."""
    tokens = stream_tokens(N_TARGETS + 1)
    clean = _ttt(tiny_model(), tokens)
    k = 4
    poisoned = tokens.copy()
    lo, hi = (k + 1) * CHUNK, (k + 2) * CHUNK  # chunk k+1's targets are tokens lo+1 … hi
    poisoned[lo + 1 : hi + 1] = np.random.default_rng(0).integers(2, 1024, hi - lo)
    dirty = _ttt(tiny_model(), poisoned)
    assert _chunk_nats(dirty)[: k + 1] == _chunk_nats(clean)[: k + 1]  # bit-identical
    assert _chunk_nats(dirty)[k + 1] != _chunk_nats(clean)[k + 1]
    # ... and TTT did change the scores: later chunks differ from a run without updates.
    frozen = _ttt(tiny_model(), tokens, ttt_epochs=0)
    assert _chunk_nats(frozen)[0] == _chunk_nats(clean)[0]  # nothing trained before chunk 0
    later = zip(_chunk_nats(frozen)[1:], _chunk_nats(clean)[1:], strict=True)
    assert all(a != b for a, b in later)


def _document_nats(tokens) -> np.ndarray:
    documents = DocumentSums(document_starts(tokens), torch.device("cpu"))
    _ttt(tiny_model(), tokens, documents=documents)
    return documents.table[:, 0].numpy()


def test_no_score_depends_on_a_later_token_even_inside_the_next_chunk():
    """Documents of 128 targets give sub-chunk resolution: poison the stream from the middle of
    chunk k+1 on; every document before that point, the first half of chunk k+1 included, keeps
    its first-pass loss bit for bit. Training on chunk k+1 before scoring it would break this."""
    tokens = stream_tokens(N_TARGETS + 1)
    tokens[tokens == BOS_ID] = 5
    tokens[::128] = BOS_ID
    cut = 5 * CHUNK + CHUNK // 2  # the first poisoned target; its token is cut + 1
    poisoned = tokens.copy()
    poisoned[cut + 1 :] = np.random.default_rng(1).integers(2, 1024, len(tokens) - cut - 1)
    poisoned[::128] = BOS_ID  # same documents, only their contents change
    clean, dirty = _document_nats(tokens), _document_nats(poisoned)
    before = cut // 128
    assert np.array_equal(dirty[:before], clean[:before])
    assert np.all(dirty[before:] != clean[before:])


@pytest.mark.parametrize("reset, chunk", [(False, CHUNK), (True, 300)])
def test_each_target_is_scored_exactly_once_with_ttt(monkeypatch, reset, chunk):
    tokens = stream_tokens(N_TARGETS + 1)
    counts = np.zeros(N_TARGETS, dtype=np.int64)
    original = ScoredLedger.record

    def counting(self, lo, hi):
        counts[lo:hi] += 1
        return original(self, lo, hi)

    monkeypatch.setattr(ScoredLedger, "record", counting)
    result = _ttt(tiny_model(), tokens, per_document_reset=reset, ttt_chunk_tokens=chunk)
    assert np.all(counts == 1)
    assert result.sums.tokens == N_TARGETS == result.ledger.count
    assert not result.chunks[-1].trained  # the last-chunk guard
    assert all(c.trained for c in result.chunks[:-1])


def test_training_tokens_come_only_from_the_ledger(monkeypatch):
    def refuse(self, lo, hi):
        raise LedgerViolation("release called")

    monkeypatch.setattr(ScoredLedger, "release", refuse)
    with pytest.raises(LedgerViolation, match="release called"):
        _ttt(tiny_model(), stream_tokens(N_TARGETS + 1))


def test_the_ledger_refuses_unscored_and_twice_scored_targets():
    tokens = np.arange(101) % 1000
    ledger = ScoredLedger(tokens)
    ledger.record(0, 40)
    assert ledger.release(0, 40).tokens.tolist() == list(range(41))
    with pytest.raises(LedgerViolation, match="target 40, not yet scored"):
        ledger.release(30, 41)
    with pytest.raises(LedgerViolation, match="target 39 scored a second time"):
        ledger.record(39, 50)
    ledger.record(50, 60)  # a gap: [40, 50) unscored
    with pytest.raises(LedgerViolation, match="target 49, not yet scored"):
        ledger.release(50, 60)  # input token 50 is target 49, still unseen
    assert ledger.count == 50 and ledger.is_scored(50, 60) and not ledger.is_scored(0, 41)


def test_the_chunk_trainer_takes_only_tokens_the_ledger_released():
    model = tiny_model()
    cfg = EvalConfig(ttt_enabled=True, ttt_epochs=1, ttt_lr=0.05)
    named = ttt_params(model, cfg)
    trainer = ChunkTrainer(model, named, ttt_optimizer(model, named, cfg), cfg, CPU_WORLD, 64)
    tokens = stream_tokens(2 * CHUNK + 1)
    ledger = ScoredLedger(tokens)
    ledger.record(0, CHUNK)
    start = [p.detach().clone() for _, p in named]
    with pytest.raises(LedgerViolation, match="ndarray, not tokens the ledger released"):
        trainer.train(tokens[: CHUNK + 1], lr=0.05)  # the very tokens scored, but not released
    with pytest.raises(LedgerViolation, match=f"target {CHUNK}, not yet scored"):
        trainer.train(ledger.release(CHUNK // 2, CHUNK + 1), lr=0.05)
    with pytest.raises(LedgerViolation, match="only from ScoredLedger.release"):
        ScoredTokens(tokens[: CHUNK + 1], object())
    released = ledger.release(0, CHUNK)
    with pytest.raises(ValueError, match="read-only"):
        released.tokens[-1] = 7  # no planting a token into a released span either
    assert all(torch.equal(p, s) for (_, p), s in zip(named, start, strict=True))
    assert trainer.train(released, lr=0.05) == 1  # 8 sequences of 64, one batch
    assert not all(torch.equal(p, s) for (_, p), s in zip(named, start, strict=True))


def test_only_the_prequant_module_opens_the_illegal_door():
    """Raw tokens reach a TTT step only through the illegal door, which only pre-quant TTT uses."""
    root = Path(pgolf.__file__).parent
    users: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [getattr(node, "id", None), getattr(node, "attr", None)]
            if isinstance(node, ast.Import | ast.ImportFrom):
                names += [alias.name for alias in node.names]
            for name in ("train_step_on_unscored_tokens_illegal", "_step_on_raw_tokens"):
                if name in names:
                    users.setdefault(name, set()).add(module)
    assert users == {
        "train_step_on_unscored_tokens_illegal": {"pgolf.eval.prequant"},
        "_step_on_raw_tokens": {"pgolf.eval.ttt"},
    }
    ttt_source = ast.parse((root / "eval" / "ttt.py").read_text())
    callers = {
        fn.name
        for fn in ast.walk(ttt_source)
        if isinstance(fn, ast.FunctionDef)
        for node in ast.walk(fn)
        if isinstance(node, ast.Name) and node.id == "_step_on_raw_tokens"
    }
    assert callers == {"train_step", "train_step_on_unscored_tokens_illegal"}


def test_the_model_is_restored_and_frozen_blocks_never_move():
    model = tiny_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    tokens = stream_tokens(4 * CHUNK + 1)
    _ttt(model, tokens, ttt_freeze_blocks=1)
    for name, p in model.named_parameters():
        assert torch.equal(p, start[name]), name
    _ttt(model, tokens, restore=False, ttt_freeze_blocks=1)
    for name, p in model.named_parameters():
        moved = not torch.equal(p, start[name])
        assert moved == (name.startswith("blocks.1.") or not name.startswith("blocks.")), name
        assert p.requires_grad == flags[name]


# -- seed options -----------------------------------------------------------------------------
def _zeros(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape))


class _SeedNames(nn.Module):
    """The parameter names of the sp1024 seed stacks (SPEC §9), four blocks."""

    def __init__(self):
        super().__init__()
        p = _zeros
        self.tok_emb = nn.Embedding(8, 4)
        with_role(self.tok_emb.weight, "embedding")
        self.bigram = nn.ModuleDict({"embed": nn.Embedding(8, 4), "proj": nn.Linear(4, 4)})
        with_role(self.bigram["embed"].weight, "embedding")
        self.bigram.scale = p(1)
        self.ve_shared = nn.ModuleDict({"embed": nn.Embedding(8, 4)})
        self.ve_shared.scale = p(1)
        self.ve_layer_scales = nn.ParameterList([p(1), p(1)])
        self.skip_weights = p(2, 4)
        self.smear = nn.Module()
        self.smear.gate = p(4)
        self.blocks = nn.ModuleList()
        for _ in range(4):
            block = nn.Module()
            block.attn = nn.Module()
            block.attn.c_q = nn.Linear(4, 4, bias=False)
            block.attn_scale = p(4)
            self.blocks.append(block)


def _chosen(**rules) -> set[str]:
    return {name for name, _ in select_ttt_params(_SeedNames(), **rules)}


def test_parameter_selection_reproduces_each_seed():
    every = {n for n, _ in _SeedNames().named_parameters()}

    def blocks(*ids: int) -> set[str]:
        return {n for n in every if any(n.startswith(f"blocks.{i}.") for i in ids)}

    outside = {"skip_weights", "smear.gate"}
    # P610: blocks 2–3 (of 4), skips, smear; tables and VE scales frozen.
    p610 = _chosen(freeze_blocks=2, freeze_prefixes="tok_emb,bigram,ve_shared,ve_layer_scales")
    assert p610 == blocks(2, 3) | outside
    # P578: the same but VE scales adapt.
    p578 = _chosen(freeze_blocks=2, freeze_prefixes="tok_emb,bigram,ve_shared")
    assert p578 == blocks(2, 3) | outside | {"ve_layer_scales.0", "ve_layer_scales.1"}
    # P639's run: freeze the first blocks only; everything outside the blocks still adapts.
    assert _chosen(freeze_blocks=3) == every - blocks(0, 1, 2)
    # P1004: the last two blocks plus every name containing norm/scale/lm_head.
    p1004 = _chosen(train_last_blocks=2, also_train="norm,scale,lm_head")
    scales = {n for n in every if "scale" in n}
    assert p1004 == blocks(2, 3) | scales
    # Embeddings by role: the token and bigram tables, whatever their names.
    assert every - _chosen(freeze_embeddings=True) == {"tok_emb.weight", "bigram.embed.weight"}


def test_learning_rate_schedules():
    assert chunk_lr(0.002, 0, 1893, "cosine") == 0.002
    assert chunk_lr(0.002, 1892, 1893, "cosine") == pytest.approx(0.0, abs=1e-18)
    assert chunk_lr(0.002, 899, 1893, "cosine") == pytest.approx(0.00108, rel=0.01)  # P610
    assert chunk_lr(0.002, 500, 200, "cosine") == pytest.approx(0.0, abs=1e-18)  # P578 window
    assert chunk_lr(0.002, 7, 10, "constant") == 0.002
    # P639's double cosine: three steps per chunk get 1.0, 0.55, 0.10 of the chunk's LR.
    factors = [step_lr_factor(s, 3, 0.1, "double_cosine") for s in range(3)]
    assert factors == pytest.approx([1.0, 0.55, 0.10])
    assert step_lr_factor(1, 3, 0.1, "cosine") == 1.0
    # P1351-style multipliers: 0.3× on block 0 rising to 1.0× on block 10.
    assert block_lr_multiplier("blocks.0.attn.c_q.weight", 11, 0.3) == pytest.approx(0.3)
    assert block_lr_multiplier("blocks.5.mlp.fc.weight", 11, 0.3) == pytest.approx(0.65)
    assert block_lr_multiplier("blocks.10.attn_scale", 11, 0.3) == pytest.approx(1.0)
    assert block_lr_multiplier("tok_emb.weight", 11, 0.3) == 1.0


def test_born_rule_snr_scaling_only_shrinks_gaussian_gradients():
    torch.manual_seed(0)
    shapes = {"blocks.0.a": (400, 50), "blocks.0.b": (50,), "tok_emb.weight": (300, 40)}
    shapes["ve_layer_scales.0"] = (1,)
    named = [(name, _zeros(*shape)) for name, shape in shapes.items()]
    for _, p in named:
        p.grad = torch.randn_like(p)
    factors = scale_grads_by_snr_(named, born=True)
    assert factors["blocks.0"] == pytest.approx(2 / math.pi, rel=0.03)  # SNR² ≈ (√(2/π))²
    assert factors["tok_emb"] == pytest.approx(2 / math.pi, rel=0.03)
    assert factors["ve_layer_scales.0"] == 3.0  # no std for one element: the upper clamp
    assert snr_group_key("blocks.7.attn.c_q.weight") == "blocks.7"
    assert snr_group_key("bigram.embed.weight") == "bigram"
    for _, p in named:
        p.grad = torch.randn_like(p)
    assert scale_grads_by_snr_(named, born=False)["blocks.0"] == pytest.approx(0.80, rel=0.03)


def test_a_ttt_ema_that_never_moves_scores_like_no_ttt():
    tokens = stream_tokens(4 * CHUNK + 1)
    frozen = _ttt(tiny_model(), tokens, ttt_epochs=0)
    still = _ttt(tiny_model(), tokens, ttt_ema_decay=1.0)
    assert _chunk_nats(still) == _chunk_nats(frozen)
    assert still.chunks_trained == 3
    moving = _ttt(tiny_model(), tokens, ttt_ema_decay=0.5)
    assert _chunk_nats(moving)[1:] != _chunk_nats(frozen)[1:]


def test_a_fixed_training_window_trains_only_the_first_chunks():
    result = _ttt(tiny_model(), stream_tokens(N_TARGETS + 1), ttt_train_chunks=3)
    assert [c.trained for c in result.chunks] == [True] * 3 + [False] * 5
    assert [c.lr for c in result.chunks[:3]] == pytest.approx([0.05, 0.025, 0.0], abs=1e-12)


def test_every_optimizer_option_runs_and_stays_finite():
    result = _ttt(
        tiny_model(),
        stream_tokens(4 * CHUNK + 1),
        ttt_optimizer="adamw",
        ttt_lr=1e-3,
        ttt_batch_seqs=0,
        ttt_lr_schedule="double_cosine",
        ttt_block_lr_start=0.3,
        ttt_snr_scaling=True,
        ttt_snr_born=True,
        ttt_freeze_embeddings=True,
    )
    assert result.chunks_trained == 3 and math.isfinite(result.sums.bpb)
    assert result.chunks[0].steps == 2  # full batch: one step per epoch
    mini = _ttt(tiny_model(), stream_tokens(4 * CHUNK + 1), ttt_batch_seqs=3)
    assert mini.chunks[0].steps == 2 * 3  # 8 sequences of 64 in batches of 3


def test_step_plan_splits_sequences_over_ranks_and_counts_global_targets():
    lengths = [64] * 7 + [10]
    two = [World(r, 2, r, torch.device("cpu")) for r in (0, 1)]
    plans = [step_plan(lengths, w, batch_seqs=3) for w in two]
    assert [list(m) for m, _ in plans[0]] == [[0, 1, 2], [3]]
    assert [list(m) for m, _ in plans[1]] == [[4, 5, 6], [7]]
    assert [g for _, g in plans[0]] == [g for _, g in plans[1]] == [6 * 64, 64 + 10]


def test_max_chunks_is_reported_as_a_fraction_of_the_validation_set():
    tokens = stream_tokens(N_TARGETS + 1)
    result = run_eval(
        tiny_model(),
        tokens,
        eval_mode="sliding",
        eval_stride=32,
        ttt_enabled=True,
        ttt_chunk_tokens=CHUNK,
        ttt_epochs=1,
        ttt_max_chunks=3,
        ttt_score_baseline=True,
    )
    assert result["partial"] and "#610" in result["partial_reason"]
    assert result["coverage"] == pytest.approx(3 / 8)
    assert result["val_tokens"] == 3 * CHUNK
    assert result["val_tokens"] < result["scorable_targets"]
    assert result["ttt"]["chunks_scored"] == 3 and result["ttt"]["chunks_trained"] == 2
    assert result["ttt"]["bpb_after"] == result["val_bpb"]
    assert result["ttt"]["bpb_before"] is not None  # the full stream, without TTT


def test_prequant_ttt_on_validation_data_refuses_without_the_research_flag():
    model = tiny_model()
    tokens = stream_tokens(8 * 64 + 1)
    cfg = EvalConfig(prequant_ttt_enabled=True, prequant_ttt_epochs=1)
    with pytest.raises(IllegalEvaluationError, match="before that token is scored"):
        prequant_ttt(model, tokens, cfg, CPU_WORLD, seq_len=64)
    before = model.tok_emb.weight.detach().clone()
    record = prequant_ttt(model, tokens, cfg, CPU_WORLD, seq_len=64, allow_illegal=True)
    assert record["score_first"] is False and "§5.30" in record["reason"]
    assert record["sequences"] == 8 and record["steps"] == 1
    assert not torch.equal(model.tok_emb.weight, before)


# -- eval.compile ----------------------------------------------------------------------------
def test_compiled_scoring_and_ttt_step_agree_with_eager(monkeypatch):
    """eval.compile="on" (what auto means on CUDA) gives the eager s_0 within float tolerance.

    Dynamo and AOTAutograd trace the scoring forward (both `logits_from` values), the TTT step's
    forward and backward, and the eval/train flips exactly as with Inductor; Inductor's C++
    codegen is left out because it made this test take 84 s on 2 CPU cores (it passes with it).
    """
    pytest.importorskip("torch._dynamo")
    tokens = stream_tokens(2 * CHUNK + 1)
    model = GPT(ModelConfig(num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1))
    eager = _ttt(copy.deepcopy(model), tokens, ttt_epochs=1)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = _ttt(copy.deepcopy(model), tokens, ttt_epochs=1, compile="on")
    assert len(compiled.chunks) == 2 and compiled.chunks_trained == 1
    for a, b in zip(eager.chunks, compiled.chunks, strict=True):
        assert (a.tokens, a.bytes) == (b.tokens, b.bytes)
        assert b.nats == pytest.approx(a.nats, rel=1e-5)
