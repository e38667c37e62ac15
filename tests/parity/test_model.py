"""Model parity with every official script that has a preset (issue #17 items 1 and 3d).

Each preset's model and its script's GPT, both shrunk to 4 layers × 128 (`tests.parity.models`):
- the same weights (every parameter random, so zero-init parts count too) give the same fp32
  logits, bit for bit;
- the same seed gives the same initial weights: pgolf's construction order is the script's, the
  banked scripts (S549, S1019, S1060, P1351) through `model.banked_init`;
- the precision the scripts had on CUDA, forced on the CPU: after the scripts' `.bfloat16()` and
  fp32 restore exactly the embedding tables stay bf16 (`model.bf16_tables`); the un-rescaled RoPE
  tables are built in bf16 and the NTK-rescaled ones in fp32 (`model.rope_bf16`); with both, the
  logits under bf16 autocast equal the script's; S1019's AR self-generation under bf16 autocast
  samples the same tokens (`pgolf.quant.calibration.self_generated(bf16=True)`);
- in fp32, pgolf's KV-cached self-generation samples the tokens of the scripts' full re-forward
  (S1019's `generate_autoregressive_calib`, also in P1351), past the NTK-rescale length too.
CPU autocast stands in for CUDA's: both sides run under the same one, so the comparison is exact,
but the kernels (and CUDA autocast's op lists) are not the GPU's; TF32 has no CPU counterpart.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from pgolf.model.gpt import GPT
from pgolf.quant.calibration import self_generated

from .models import (
    PRESET_SCRIPT,
    official_gpt,
    official_logits,
    official_state_dict,
    pair,
    to_upstream_precision,
)
from .official import assert_close, cuda_autocast_on_cpu

PRESETS = list(PRESET_SCRIPT)


def _randomized(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return module


def _loaded_pair(preset: str, **precision):
    """(module, official model with random weights, pgolf model holding the same weights)."""
    mod, cfg = pair(preset)
    for key, value in precision.items():
        setattr(cfg, key, value)
    ref = _randomized(official_gpt(mod))
    if precision.get("bf16_tables") == "on":
        to_upstream_precision(mod, ref)
    ours = GPT(cfg)
    ours.load_state_dict(official_state_dict(mod, ref))
    return mod, ref, ours


def _loop_modes(ref, ours):
    """Each layer order the model can run: S1413's recurrence off (as it starts) and on."""
    if not ours.layout.has_recurrence:
        yield "plain"
        return
    for active in (False, True):
        ref.looping_active = active
        ours.set_recurrence(active)
        yield "looped" if active else "plain"


@pytest.mark.parametrize("preset", PRESETS)
def test_same_weights_give_the_official_logits(preset):
    mod, ref, ours = _loaded_pair(preset)
    x = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(2))
    for mode in _loop_modes(ref, ours):
        with torch.no_grad():
            assert_close(f"{preset} {mode} logits", ours(x), official_logits(mod, ref, x))


@pytest.mark.parametrize("preset", PRESETS)
def test_same_seed_gives_the_official_initial_weights(preset):
    mod, cfg = pair(preset)
    torch.manual_seed(7)
    theirs = official_state_dict(mod, official_gpt(mod))
    torch.manual_seed(7)
    ours = GPT(cfg).state_dict()
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert_close(f"{preset} initial {name}", ours[name], value)
    # Not vacuous: the orthogonal/normal draws really happened (and the next draw lines up).
    assert ours["blocks.0.attn.c_q.weight"].abs().sum() > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_only_the_embedding_tables_stay_bf16_after_the_scripts_cast(preset):
    mod, cfg = pair(preset)
    theirs = official_state_dict(mod, to_upstream_precision(mod, official_gpt(mod)))
    cfg.bf16_tables = "on"
    ours = GPT(cfg).state_dict()
    bf16 = {name for name, t in theirs.items() if t.dtype == torch.bfloat16}
    assert all(t.dtype in (torch.bfloat16, torch.float32) for t in theirs.values())
    assert "tok_emb.weight" in bf16
    assert {name for name, t in ours.items() if t.dtype == torch.bfloat16} == bf16


@pytest.mark.parametrize("preset", PRESETS)
def test_rope_tables_are_the_official_bf16_cast_ones(preset):
    """Positions ≤ T0 (or any, without NTK) in bf16, above 256 rounded; above T0 rebuilt fp32."""
    mod, cfg = pair(preset)
    cfg.rope_bf16 = "on"
    theirs = official_gpt(mod).bfloat16().blocks[0].attn.rotary
    ours = GPT(cfg).blocks[0].attn.rotary
    lengths = [300] + ([cfg.rope_train_seq_len + 64] if cfg.rope_train_seq_len else [])
    for t in lengths:
        cos, sin = ours(t, torch.float32)
        ref_cos, ref_sin = theirs(t, torch.device("cpu"), torch.float32)
        half = cos.size(-1)
        assert_close(f"{preset} RoPE cos at T={t}", cos.reshape(t, half), ref_cos.reshape(t, half))
        assert_close(f"{preset} RoPE sin at T={t}", sin.reshape(t, half), ref_sin.reshape(t, half))
    # Not vacuous: in bf16, position 257 rounds to 256, so both rows are the same angle.
    cos, _ = ours(300, torch.float32)
    assert torch.equal(cos[0, 0, 256], cos[0, 0, 257])


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_tables_and_rope_under_autocast_give_the_official_logits(preset):
    mod, ref, ours = _loaded_pair(preset, bf16_tables="on", rope_bf16="on")
    # Short: the bf16 RoPE rounding past position 256 is checked table by table above.
    x = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(3))
    for mode in _loop_modes(ref, ours):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = ours(x), official_logits(mod, ref, x).float()
        assert_close(f"{preset} {mode} bf16 logits", got, want)


def test_self_generation_in_bf16_samples_the_official_tokens():
    """S1019's generate_autoregressive_calib on its bf16-table model under (CPU) bf16 autocast."""
    mod, ref, ours = _loaded_pair("pr1019", bf16_tables="on", rope_bf16="on")
    with cuda_autocast_on_cpu():
        theirs = mod.generate_autoregressive_calib(
            ref, torch.device("cpu"), num_seqs=2, seq_len=16, vocab_size=1024, batch_size=2, seed=5
        )
    ours_batches = self_generated(
        ours, 2, 16, vocab_size=1024, temperature=0.8, seed=5, batch_size=2, bf16=True
    )
    tokens = torch.cat(list(ours_batches))
    assert_close("S1019 self-generated tokens", tokens, torch.cat(theirs))


@pytest.mark.parametrize("preset", ["pr1019", "seed-p1351"])
def test_cached_self_generation_samples_the_official_re_forward_tokens(preset):
    """Nominal RoPE length cut to 8 on both sides, so most steps run NTK-rescaled."""
    mod, ref, ours = _loaded_pair(preset, rope_train_seq_len=8)
    rotaries = [m for m in ref.modules() if isinstance(m, mod.Rotary)]
    assert rotaries
    for rotary in rotaries:
        rotary.train_seq_len = 8
    # Its CUDA autocast leaves CPU tensors alone: fp32 (CPU-only torch warns it disables it).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        theirs = mod.generate_autoregressive_calib(
            ref, torch.device("cpu"), num_seqs=3, seq_len=24, vocab_size=1024, batch_size=2, seed=6
        )
    ours_batches = self_generated(
        ours, 3, 24, vocab_size=1024, temperature=0.8, seed=6, batch_size=2, kv_cache=True
    )
    tokens = torch.cat(list(ours_batches))
    assert_close(f"{preset} KV-cached self-generated tokens", tokens, torch.cat(theirs))
    # Sampling hides small logit errors, so each step's logits are checked too: with the
    # script's nominal length left at 1024 these differ by ~1e-4 and the tokens still agree.
    cache = ours.new_cache()
    with torch.no_grad():
        for t in range(tokens.size(1)):
            step = ours(tokens[:, t : t + 1], cache)[:, -1]
            want = official_logits(mod, ref, tokens[:, : t + 1])[:, -1]
            assert_close(f"{preset} cached logits at position {t}", step, want, atol=1e-5)
