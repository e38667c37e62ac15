"""Per-document LoRA TTT with phased global SGD (SPEC §1.4, §5.29 "Later refinements", §5.31).

Legality first (a poison test per phase, score-once, s_0), then the per-document reset, then the
schedule and the adapters' plumbing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pgolf.data.tokenizer import BOS_ID
from pgolf.errors import PgolfError
from pgolf.eval import lora_ttt
from pgolf.eval.budget import EvalClock
from pgolf.eval.config import EvalConfig, validate_eval_config
from pgolf.eval.ledger import LedgerViolation, ScoredLedger
from pgolf.eval.lora_ttt import batch_schedule, document_spans, phase_points, phased_lora_ttt
from pgolf.eval.scorer import DocumentSums
from pgolf.eval.windows import document_starts
from pgolf.model.gpt import GPT
from pgolf.model.lora import LoRAAdapters
from tests.test_eval_scorer import byte_tables, run_eval, stream_tokens, tiny_model
from tests.test_ttt import CPU_WORLD

# 12 documents of 45 … 210 targets; batches of 3 → 4 batches; 2 phases over the first 6
# documents run after batches 0 and 1 (stream order).
BOUNDS = [0, 90, 230, 275, 400, 610, 700, 900, 1010, 1200, 1390, 1500, 1601]
SETTINGS = dict(
    ttt_enabled=True,
    ttt_mode="lora",
    ttt_lora_rank=4,
    ttt_lora_alpha=8.0,
    ttt_lora_lr=0.01,
    ttt_lora_chunk=16,
    ttt_lora_context=64,
    ttt_lora_batch_docs=3,
    ttt_phases=2,
    ttt_prefix_docs=6,
    ttt_lr=0.01,
    ttt_epochs=1,
    ttt_chunk_tokens=256,
    ttt_batch_seqs=4,
)


def _tokens() -> np.ndarray:
    tokens = stream_tokens(BOUNDS[-1])
    tokens[tokens == BOS_ID] = 5
    tokens[BOUNDS[:-1]] = BOS_ID
    return tokens


def _run(tokens, model=None, **settings):
    """(result, per-document nats) of phased LoRA TTT over `tokens` with SETTINGS."""
    cfg = EvalConfig(**{**SETTINGS, **settings})
    documents = DocumentSums(document_starts(tokens), torch.device("cpu"))
    result = phased_lora_ttt(
        model or tiny_model(),
        tokens,
        byte_tables(),
        cfg,
        CPU_WORLD,
        context=64,
        clock=EvalClock(0.0, "warn", CPU_WORLD),
        documents=documents,
    )
    return result, documents.table[:, 0].numpy().copy()


def _poison(tokens: np.ndarray, doc: int) -> np.ndarray:
    """Document `doc`'s tokens after its BOS replaced (document boundaries unchanged)."""
    lo, hi = BOUNDS[doc] + 1, BOUNDS[doc + 1]
    dirty = tokens.copy()
    dirty[lo:hi] = np.random.default_rng(doc).integers(2, 1024, hi - lo)
    return dirty


def _record_phase_weights(monkeypatch) -> list[list[torch.Tensor]]:
    """The model's weights after every global phase, appended as the runs go."""
    snapshots: list[list[torch.Tensor]] = []
    original = lora_ttt._global_phase

    def recording(model, *args, **kwargs):
        out = original(model, *args, **kwargs)
        snapshots.append([p.detach().clone() for p in model.parameters()])
        return out

    monkeypatch.setattr(lora_ttt, "_global_phase", recording)
    return snapshots


# -- legality ---------------------------------------------------------------------------------
@pytest.mark.parametrize("doc, phase_end", [(1, 3), (4, 6), (7, 12)])
def test_poisoning_a_document_moves_nothing_scored_or_trained_before_it(
    monkeypatch, doc, phase_end
):
    """Poison document `doc` (phase 1, phase 2, after the phases). Every other document scored
    before the next global update keeps its first-pass nats bit for bit (in the same batch too:
    rows are independent), every update made before `doc` was scored keeps its weights bit for
    bit, and every document after the next global update moves (it learnt from `doc`)."""
    tokens = _tokens()
    snapshots = _record_phase_weights(monkeypatch)
    _, clean = _run(tokens)
    _, dirty = _run(_poison(tokens, doc))
    clean_weights, dirty_weights = snapshots[:2], snapshots[2:]
    others = [d for d in range(phase_end) if d != doc]
    assert np.array_equal(dirty[others], clean[others])
    assert dirty[doc] != clean[doc]
    assert np.all(dirty[phase_end:] != clean[phase_end:])
    for k, end in enumerate((3, 6)):  # the phases run after documents 0-2 and 3-5
        pairs = zip(clean_weights[k], dirty_weights[k], strict=True)
        assert all(torch.equal(a, b) for a, b in pairs) == (end <= doc)


def test_each_target_is_scored_exactly_once_and_s0_is_reported(monkeypatch):
    tokens = _tokens()
    counts = np.zeros(len(tokens) - 1, dtype=np.int64)
    original = ScoredLedger.record

    def counting(self, lo, hi):
        counts[lo:hi] += 1
        return original(self, lo, hi)

    monkeypatch.setattr(ScoredLedger, "record", counting)
    result, nats = _run(tokens)
    assert np.all(counts == 1)
    assert result.sums.tokens == len(tokens) - 1 == result.ledger.count
    assert result.sums.nats == pytest.approx(nats.sum(), rel=1e-12)
    assert result.chunks_trained == result.chunks_scored - 12  # every last chunk untrained
    report = run_eval(tiny_model(), tokens, eval_seq_len=64, **SETTINGS)
    assert report["ttt"]["bpb_after"] == report["val_bpb"] == result.sums.bpb  # s_0
    assert report["ledger_targets"] == report["val_tokens"] == len(tokens) - 1


def test_training_on_an_unscored_chunk_raises():
    tokens = _tokens()
    ledger = ScoredLedger(tokens, document_starts(tokens))
    ledger.record(0, 100)
    with pytest.raises(LedgerViolation):
        ledger.release(90, 110)  # targets 100 … 109 are not scored
    # A document may be trained from its BOS before the previous one's last target (that BOS)
    # is scored: the partition is given; any other start still needs its input scored.
    ledger.record(230, 260)
    assert ledger.release(230, 260).tokens[0] == BOS_ID
    plain = ScoredLedger(tokens)
    plain.record(230, 260)
    with pytest.raises(LedgerViolation):
        plain.release(230, 260)


# -- per-document reset -----------------------------------------------------------------------
def test_without_phases_a_document_scores_as_it_would_alone():
    tokens = _tokens()
    _, together = _run(tokens, ttt_phases=0)
    for doc in (0, 4, 10):
        alone = tokens[BOUNDS[doc] : BOUNDS[doc + 1] + 1]
        _, nats = _run(alone, ttt_phases=0)
        assert nats[0] == pytest.approx(together[doc], rel=1e-6)
    # ... and the adapters really learn: all but the first chunk of each document move.
    _, frozen = _run(tokens, ttt_phases=0, ttt_lora_lr=0.0)
    assert np.all(frozen != together)


def test_tops_warm_start_carries_a_across_documents():
    tokens = _tokens()
    _, fresh = _run(tokens, ttt_phases=0)
    _, warm = _run(tokens, ttt_phases=0, ttt_lora_warm_start_a=True)
    assert np.array_equal(warm[:3], fresh[:3])  # the first batch starts from the same A
    assert np.all(warm[3:] != fresh[3:])


# -- schedule ---------------------------------------------------------------------------------
def test_schedule_stream_and_length_orders():
    lengths = np.array([5, 9, 2, 9, 7, 1, 3])
    stream = batch_schedule(lengths, 3, "stream")
    assert [b.tolist() for b in stream] == [[0, 1, 2], [3, 4, 5], [6]]
    by_length = batch_schedule(lengths, 3, "length")  # sorted ascending, longest batch first
    assert [b.tolist() for b in by_length] == [[0, 4, 1], [3], [5, 2, 6]]
    assert phase_points(stream, prefix_docs=6, phases=3) == [0, 1]  # 2, 4, 6 docs
    assert phase_points(stream, prefix_docs=6, phases=0) == []
    assert phase_points(stream, prefix_docs=100, phases=1) == [2]


def test_length_order_is_legal_too():
    tokens = _tokens()
    result, _ = _run(tokens, ttt_doc_order="length")
    assert result.ledger.count == len(tokens) - 1 and len(result.phases) == 2


def test_document_spans_cover_every_target_once():
    starts, ends = document_spans(_tokens())
    assert starts.tolist() == BOUNDS[:-1] and ends.tolist() == [*BOUNDS[1:-1], BOUNDS[-1] - 1]


def test_settings_are_checked():
    with pytest.raises(PgolfError, match="ttt_mode"):
        validate_eval_config(EvalConfig(ttt_mode="slot"))
    with pytest.raises(PgolfError, match="chunk' only"):
        validate_eval_config(EvalConfig(ttt_mode="lora", ttt_max_chunks=3))
    with pytest.raises(PgolfError, match="unknown LoRA targets"):
        _run(_tokens(), ttt_lora_targets="q,lm_head")


# -- adapters ---------------------------------------------------------------------------------
def test_fresh_adapters_change_nothing_and_leave_no_trace():
    model = tiny_model()
    x = torch.from_numpy(_tokens()[:128].reshape(2, 64).astype(np.int64))
    with torch.no_grad():
        want = model(x)
    before = dict(model.named_modules())
    adapters = LoRAAdapters(model, 2, 4, 8.0, ("q", "k", "v", "o", "mlp", "head"))
    with torch.no_grad(), adapters.attached(model):
        assert torch.equal(model(x), want)  # B = 0
        for lora in adapters.adapters():
            lora.B.normal_()
        assert not torch.allclose(model(x), want)
    with torch.no_grad():
        assert torch.equal(model(x), want)
    assert dict(model.named_modules()) == before and model.lm_head is None
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_each_row_has_its_own_adapter():
    model = tiny_model()
    x = torch.from_numpy(_tokens()[:128].reshape(2, 64).astype(np.int64))
    adapters = LoRAAdapters(model, 2, 4, 8.0, ("q", "v", "mlp", "head"))
    with torch.no_grad():
        for lora in adapters.adapters():
            lora.B[1].normal_()
        with adapters.attached(model):
            both = model(x)
            adapters.use_rows(torch.tensor([1]))
            second = model(x[1:])
        plain = model(x)
    assert torch.equal(both[0], plain[0]) and not torch.allclose(both[1], plain[1])
    torch.testing.assert_close(second[0], both[1])


def test_one_slot_per_layer_call_under_recurrence():
    cfg = dataclasses.replace(tiny_model().cfg, num_layers=4, num_loops=1, loop_start=1, loop_end=2)
    model = GPT(cfg)
    encoder, decoder = model.layout.looped
    assert LoRAAdapters(model, 1, 2, 2.0, ("q",)).slots == len(encoder) + len(decoder) > 4
