"""Incremental decoding with the KV cache (`pgolf.model.decode`) against the full forward.

Every preset, shrunk to 4 × 128 with random weights, decodes one token at a time and each step's
logits must equal the full forward's last position over the same prefix. The nominal RoPE length
is cut to 8 so that the NTK base changes at every step past it, and variants switch on what no
preset uses (trigram hash, BOS-aware SmearGate, output gate, recurrence with parallel residuals,
TOP's two lanes).
Self-generation with the cache must sample exactly the tokens of the full re-forward.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pgolf.config import load_preset
from pgolf.dist import World
from pgolf.errors import PgolfError
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT
from pgolf.quant import calibration, pipeline
from pgolf.quant.hessian import collect_hessians
from tests.parity.models import PRESET_SCRIPT, shrunk_config, top_config

TOL = 1e-5
LENGTH = 14  # past the cut nominal RoPE length of 8, so the NTK base moves at every later step


def _variant(preset: str, **changes) -> ModelConfig:
    cfg = shrunk_config(preset)
    cfg.vocab_size = 96
    if cfg.rope_train_seq_len:
        cfg.rope_train_seq_len = 8
    return dataclasses.replace(cfg, **changes)


CONFIGS = {p: _variant(p) for p in PRESET_SCRIPT} | {
    "pr1019+trigram+gate": _variant("pr1019", bigram_trigram=True, attn_out_gate=True),
    "seed-p639+bos-smear": _variant("seed-p639", smear_gate="v2", bos_id=5),
    "pr1413+parallel": _variant("pr1413", parallel_residual_start=2),
    "top": dataclasses.replace(top_config(), vocab_size=96),
}


def _random_gpt(cfg: ModelConfig, seed: int = 0) -> GPT:
    model = GPT(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            # Zero-init and gate parameters made random too, so every path carries signal.
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _modes(model: GPT):
    for active in (False, True) if model.layout.has_recurrence else (False,):
        model.set_recurrence(active)
        yield "looped" if active else "plain"


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_step_by_step_logits_equal_the_full_forward_at_every_position(name):
    model = _random_gpt(CONFIGS[name])
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.cfg.vocab_size, (2, LENGTH), generator=gen)
    ids[0, 6] = 5  # a BOS for the BOS-aware SmearGate variant to mask
    for mode in _modes(model):
        cache = model.new_cache()
        for t in range(LENGTH):
            step = model(ids[:, t : t + 1], cache)[:, -1]
            full = model(ids[:, : t + 1])[:, -1]
            err = (step - full).abs().max().item()
            assert err <= TOL, f"{name} {mode}: position {t} logits differ by {err:.3g}"
        assert cache.length == LENGTH


@torch.no_grad()
def test_a_prefilled_chunk_then_steps_equal_the_full_forward():
    """Several new positions at once need the causal mask shifted past the cached keys.

    Each chunk is compared with a forward over the prefix it ends: past the nominal length
    the NTK base, and so every position's logits, depend on the total length.
    """
    model = _random_gpt(CONFIGS["pr1019"])
    ids = torch.randint(0, 96, (2, LENGTH), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache()
    for start, end in ((0, 5), (5, 11), (11, LENGTH)):
        got = model(ids[:, start:end], cache)
        want = model(ids[:, :end])[:, start:]
        assert got.shape == want.shape
        err = (got - want).abs().max().item()
        assert err <= TOL, f"chunk {start}..{end} logits differ by {err:.3g}"


@torch.no_grad()
def test_without_the_ntk_rerotation_the_cache_would_drift():
    """Not vacuous: past the nominal length a key rotated once, under an older base, is wrong."""
    model = _random_gpt(CONFIGS["pr1019"])
    ids = torch.randint(0, 96, (1, LENGTH), generator=torch.Generator().manual_seed(3))
    rotary = model.blocks[0].attn.rotary
    stale = model.new_cache()
    for t in range(LENGTH):
        for layer in stale.layers:
            if layer.k is not None:
                layer.k_base = rotary.base_at(t + 1)  # claim the old keys already use this base
        step = model(ids[:, t : t + 1], stale)[:, -1]
    assert (step - model(ids)[:, -1]).abs().max().item() > 5 * TOL  # what the test above fails


def test_a_cache_from_the_other_recurrence_mode_is_refused():
    model = _random_gpt(CONFIGS["pr1413"])
    model.set_recurrence(False)
    cache = model.new_cache()
    model.set_recurrence(True)
    with pytest.raises(PgolfError, match="recurrence"):
        model(torch.zeros(1, 1, dtype=torch.long), cache)


@pytest.mark.parametrize("name", ["baseline", "pr1019", "seed-p639"])
def test_self_generation_with_the_cache_samples_the_re_forward_tokens(name):
    model = _random_gpt(CONFIGS[name])
    make = lambda kv: list(  # noqa: E731
        calibration.self_generated(
            model, 3, LENGTH, vocab_size=96, seed=4, batch_size=2, kv_cache=kv, temperature=1.5
        )
    )
    cached, reforward = make(True), make(False)
    assert [tuple(b.shape) for b in cached] == [(2, LENGTH), (1, LENGTH)]
    for a, b in zip(cached, reforward, strict=True):
        assert torch.equal(a, b)
    assert len(set(torch.cat(cached).flatten().tolist())) > LENGTH  # sampled, not a fixed point


@pytest.mark.parametrize(("selfgen_len", "expected"), [(0, 12), (9, 9)])
def test_selfgen_length_follows_the_training_length_unless_set(selfgen_len, expected, monkeypatch):
    cfg = load_preset("pr1019")
    cfg.model = CONFIGS["pr1019"]
    cfg.train.train_seq_len = 12
    ex = cfg.quant
    ex.selfgen_len, ex.selfgen_seqs, ex.selfgen_batch = selfgen_len, 2, 2
    ex.keep_float_max_numel = 0  # the shrunk matrices would otherwise stay float, unquantised
    model = _random_gpt(cfg.model)
    seen = []
    real = calibration.self_generated

    def spy(*args, **kwargs):
        for batch in real(*args, **kwargs):
            seen.append(batch.shape[1])
            yield batch

    monkeypatch.setattr(calibration, "self_generated", spy)
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    hessians, info = pipeline.calibrate(model, cfg, None, world)
    assert info["selfgen_len"] == expected and seen == [expected]
    assert hessians


def test_selfgen_hessians_see_the_sampled_sequences_and_not_the_sampling():
    """S1019 samples first, then collects H over full forwards of the samples; the decoding
    steps' own inputs (each position once more, one at a time) must not enter H."""
    cfg = load_preset("pr1019")
    cfg.model = CONFIGS["pr1019"]
    cfg.train.train_seq_len = 12
    ex = cfg.quant
    ex.selfgen_seqs, ex.selfgen_batch, ex.keep_float_max_numel = 3, 2, 0
    model = _random_gpt(cfg.model)
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    hessians, _ = pipeline.calibrate(model, cfg, None, world)
    samples = list(
        calibration.self_generated(
            model, 3, 12, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed, batch_size=2
        )
    )
    names = pipeline.hessian_names(model, ex)
    expected = collect_hessians(model, samples, names)
    assert sorted(hessians) == sorted(expected) == sorted(names)
    for name in names:
        assert torch.equal(hessians[name], expected[name]), name
