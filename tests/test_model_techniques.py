"""Every architecture technique of SPEC §5 against its defining property, not just its shapes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pgolf.config import ModelConfig, TrainConfig
from pgolf.errors import PgolfError
from pgolf.model.attention import CausalSelfAttention, exclude_self_value
from pgolf.model.embeddings import BosSmearGate, SmearGate, bigram_buckets
from pgolf.model.gpt import GPT
from pgolf.model.layers import Rotary, apply_rotary, ntk_base, rms_norm
from pgolf.model.layout import looped_order, resolve_layout, split_encoder_decoder
from pgolf.model.roles import params_by_role, role_of
from pgolf.train.muon import Muon
from pgolf.train.optim import build_optimizers

TINY = ModelConfig(vocab_size=97, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2)
V = TINY.vocab_size

# One config per switch (plus everything at once); each must keep the model causal.
TECHNIQUES = {
    "xsa_gqa": dict(xsa_last_n=-1),
    "xsa_mha": dict(xsa_last_n=-1, num_kv_heads=4),
    "smear_v1": dict(smear_gate="v1"),
    "smear_v2": dict(smear_gate="v2", bos_id=1),
    "bigram": dict(bigram_vocab_size=31, bigram_dim=16),
    "trigram": dict(bigram_vocab_size=31, bigram_dim=16, bigram_trigram=True),
    "value_embeddings": dict(ve_enabled=True, ve_dim=8, ve_layers="-2,-1"),
    "partial_rope_ntk": dict(rope_dims=8, rope_train_seq_len=8),
    "ln_scale": dict(ln_scale=True),
    "leaky_relu2": dict(mlp_leaky_slope=0.5, mlp_mult=3.5),
    "qk_gain": dict(qk_gain_init=5.0),
    "vrl": dict(value_residual=True),
    "attn_out_gate": dict(attn_out_gate=True),
    "skip_gates": dict(skip_gates=True),
    "recurrence": dict(num_loops=2, loop_start=1, loop_end=2),
    "parallel_residuals": dict(parallel_residual_start=-2),
    "orthogonal_init": dict(orthogonal_init=True, aux_proj_scaled_init=True),
}
TECHNIQUES["everything"] = {k: v for d in TECHNIQUES.values() for k, v in d.items()}
TECHNIQUES["everything"]["num_kv_heads"] = 2


def cfg_with(**changes) -> ModelConfig:
    return dataclasses.replace(TINY, **changes)


def tiny(**changes) -> GPT:
    torch.manual_seed(0)
    return GPT(cfg_with(**changes))


def randomize(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its init: zero-init tables and gates would hide leaks."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def tokens(b: int, t: int, seed: int = 2, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def assert_causal(model: torch.nn.Module, x: torch.Tensor, vocab: int) -> None:
    """Changing tokens t+1.. never changes logits ≤ t, and does change the later ones."""
    model.eval()
    with torch.no_grad():
        base = model(x)
        for t in (0, 3, 11, x.size(1) - 2):
            changed = x.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + t) % vocab
            out = model(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
            assert not torch.allclose(out[:, t + 1], base[:, t + 1], atol=1e-4)


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_every_technique_keeps_logits_blind_to_later_tokens(name):
    model = randomize(tiny(**TECHNIQUES[name]))
    x = tokens(2, 24)
    x[:, 5] = 1  # a BOS mid-sequence: the v2 SmearGate's mask must not look ahead either
    assert_causal(model, x, V)


def test_every_technique_at_once_traces_as_one_graph_in_both_recurrence_modes():
    # One config covers every switch's code path (compiling each alone costs seconds apiece).
    # Flipping recurrence between calls recompiles once into a second graph, no graph break.
    torch._dynamo.reset()  # recompiles are counted per code object across model instances
    model = randomize(tiny(**TECHNIQUES["everything"]))
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    x = tokens(2, 16)
    with torch.no_grad():
        looped = compiled(x)
        torch.testing.assert_close(looped, model(x), atol=0, rtol=0)
        model.set_recurrence(False)
        plain = compiled(x)
        torch.testing.assert_close(plain, model(x), atol=0, rtol=0)
        model.set_recurrence(True)
        torch.testing.assert_close(compiled(x), looped, atol=0, rtol=0)
    assert not torch.allclose(looped, plain)


def test_everything_runs_under_bf16_autocast_with_float32_logits():
    # CPU autocast stands in for CUDA's: same casting rules for CastedLinear and the scalars.
    model = randomize(tiny(**TECHNIQUES["everything"]))
    x = tokens(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = model.loss(x, tokens(2, 16, seed=4))
    loss.backward()
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # masters stay fp32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -- XSA (SPEC §5.4) ------------------------------------------------------------------------
def test_xsa_removes_each_heads_component_along_its_own_value_direction():
    gen = torch.Generator().manual_seed(0)
    y, v = torch.randn(2, 6, 9, 8, generator=gen), torch.randn(2, 3, 9, 8, generator=gen)
    out = exclude_self_value(y, v)
    # Query head h is served by kv head h // 2 (SDPA's GQA grouping = repeat_interleave).
    v_hat = F.normalize(v.repeat_interleave(2, dim=1), dim=-1)
    assert (out * v_hat).sum(-1).abs().max() < 1e-5
    torch.testing.assert_close(out, y - (y * v_hat).sum(-1, keepdim=True) * v_hat)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_xsa_attention_output_is_orthogonal_to_the_tokens_own_values(num_kv_heads):
    cfg = cfg_with(num_kv_heads=num_kv_heads)
    outputs = {}
    for xsa in (False, True):
        torch.manual_seed(0)
        attn = randomize(CausalSelfAttention(cfg, xsa=xsa))
        with torch.no_grad():
            attn.proj.weight.copy_(torch.eye(cfg.model_dim))  # expose the per-head outputs
            x = torch.randn(2, 12, cfg.model_dim, generator=torch.Generator().manual_seed(3))
            out, values = attn(x)
        heads = out.reshape(2, 12, cfg.num_heads, -1).transpose(1, 2)
        v_hat = F.normalize(values.repeat_interleave(cfg.num_heads // num_kv_heads, 1), dim=-1)
        outputs[xsa] = (heads * v_hat).sum(-1).abs().max()
    assert outputs[True] < 1e-5
    assert outputs[False] > 1e-2  # the plain output does carry a self-value component


def test_xsa_last_n_selects_layers_from_the_end_and_minus_one_means_all():
    assert resolve_layout(cfg_with(num_layers=11, xsa_last_n=4)).xsa == (7, 8, 9, 10)
    assert resolve_layout(cfg_with(num_layers=11, xsa_last_n=-1)).xsa == tuple(range(11))
    assert resolve_layout(cfg_with(num_layers=4, xsa_last_n=11)).xsa == (0, 1, 2, 3)
    assert resolve_layout(cfg_with(xsa_last_n=0)).xsa == ()
    model = tiny(xsa_last_n=2)
    assert [b.attn.use_xsa for b in model.blocks] == [False, False, True, True]


# -- BigramHash (SPEC §5.8) -----------------------------------------------------------------
def _int32(value: int) -> int:
    return (value + 2**31) % 2**32 - 2**31


def test_bigram_bucket_is_the_spec_hash_and_position_zero_is_reserved():
    ids = torch.tensor([[5, 1000, 7, 60_000]])
    k = 3072
    buckets = bigram_buckets(ids, k)[0].tolist()
    assert buckets[0] == k - 1
    assert buckets[1] == ((36313 * 1000) ^ (27191 * 5)) % (k - 1)
    assert buckets[2] == ((36313 * 7) ^ (27191 * 1000)) % (k - 1)
    # 36313 · 60000 overflows int32: the records' int32 wrap-around, floored modulo.
    wrapped = _int32(36313 * 60_000) ^ _int32(27191 * 7)
    assert buckets[3] == wrapped % (k - 1)
    tri = bigram_buckets(ids, k, trigram=True)[0].tolist()
    assert tri[:2] == buckets[:2]  # no t−2 yet
    assert tri[2] == ((36313 * 7) ^ (27191 * 1000) ^ (51497 * 5)) % (k - 1)
    assert all(0 <= b < k for b in bigram_buckets(tokens(4, 50, vocab=65_536), k).flatten())


def test_bigram_embedding_adds_the_scaled_projected_row_of_its_bucket_before_the_norm():
    model = randomize(tiny(bigram_vocab_size=31, bigram_dim=16))
    x = tokens(2, 10)
    bigram = model.bigram
    with torch.no_grad():
        rows = bigram.embed.weight[bigram_buckets(x, 31)]
        expected = bigram.proj(rows) * bigram.scale
        torch.testing.assert_close(bigram(x), expected)
        assert bigram.embed.weight.shape == (31, 16) and bigram.proj.weight.shape == (64, 16)
    fresh = tiny(bigram_vocab_size=31, bigram_dim=16)
    assert not fresh.bigram.embed.weight.any() and fresh.bigram.scale.item() == pytest.approx(0.05)


# -- SmearGate (SPEC §5.7) ------------------------------------------------------------------
def test_smear_v1_mixes_each_position_with_the_previous_one_across_documents():
    gate = randomize(SmearGate(TINY))
    x, ids = torch.randn(2, 6, 64), tokens(2, 6)
    ids[:, 3] = 1
    s = torch.sigmoid(gate.gate)
    with torch.no_grad():
        out = gate(x, ids)
    torch.testing.assert_close(out[:, 0], (1 - s) * x[:, 0])
    torch.testing.assert_close(out[:, 1:], (1 - s) * x[:, 1:] + s * x[:, :-1])  # BOS too


def test_smear_v2_starts_as_identity_and_never_smears_into_a_bos():
    x, ids = torch.randn(2, 6, 64), tokens(2, 6)
    ids[:, 3] = 1
    gate = BosSmearGate(cfg_with(bos_id=1))
    with torch.no_grad():
        assert torch.equal(gate(x, ids), x)
        randomize(gate, scale=0.5)
        out = gate(x, ids)
        g = torch.sigmoid(x[..., :12] @ gate.gate_w.T)
        expected = x[:, 1:] + gate.lam * g[:, 1:] * x[:, :-1]
    assert torch.equal(out[:, 3], x[:, 3]) and torch.equal(out[:, 0], x[:, 0])
    keep = [1, 2, 4, 5]
    torch.testing.assert_close(out[:, keep], expected[:, [k - 1 for k in keep]])
    assert sum(p.numel() for p in gate.parameters()) == 13  # 12→1 weights + λ


# -- partial RoPE and NTK (SPEC §5.9) -------------------------------------------------------
def test_ntk_base_for_2048_over_1024_with_16_rotated_dims():
    assert ntk_base(10_000.0, 2048, 1024, 16) == pytest.approx(22_081, rel=1e-4)
    assert ntk_base(10_000.0, 1024, 1024, 16) == 10_000.0  # at the nominal length: unchanged
    assert ntk_base(10_000.0, 4096, 0, 16) == 10_000.0  # no nominal length: never


def test_partial_rope_rotates_only_the_first_r_dims():
    cos, sin = Rotary(16, base=10_000.0)(20, torch.float32)
    q = torch.randn(1, 2, 20, 64)
    out = apply_rotary(q, cos, sin)
    assert torch.equal(out[..., 16:], q[..., 16:])
    torch.testing.assert_close(out[..., :16], apply_rotary(q[..., :16], cos, sin))
    # Pairs (i, i + 8) inside the rotated span, with inv_freq_j = base^(−2j/16).
    angle = torch.tensor(7 * 10_000.0 ** (-2 * 3 / 16))
    e = torch.zeros(1, 1, 20, 64)
    e[..., 3] = 1.0
    rotated = apply_rotary(e, cos, sin)[0, 0, 7]
    assert rotated[3] == pytest.approx(torch.cos(angle).item(), abs=1e-6)
    assert rotated[11] == pytest.approx(-torch.sin(angle).item(), abs=1e-6)


def test_rotary_switches_to_the_ntk_base_only_above_its_nominal_length():
    plain, ntk = Rotary(16, 10_000.0), Rotary(16, 10_000.0, nominal_len=1024)
    torch.testing.assert_close(ntk(1024, torch.float32), plain(1024, torch.float32))
    cos, _ = ntk(2048, torch.float32)
    expected = Rotary(16, ntk_base(10_000.0, 2048, 1024, 16))(2048, torch.float32)[0]
    torch.testing.assert_close(cos, expected)


def test_the_models_rotary_covers_rope_dims_with_the_configured_nominal_length():
    attn = CausalSelfAttention(cfg_with(rope_dims=8, rope_train_seq_len=1024))
    assert (attn.rotary.dims, attn.rotary.nominal_len, attn.rotary.inv_freq.numel()) == (8, 1024, 4)
    assert CausalSelfAttention(TINY).rotary.dims == 16  # 0 = the whole head
    with pytest.raises(PgolfError, match="rope_dims"):
        CausalSelfAttention(cfg_with(rope_dims=6 + 12))


# -- LN scale (SPEC §5.10) ------------------------------------------------------------------
def test_ln_scale_uses_the_physical_index_in_every_pass_of_a_looped_layer():
    model = randomize(tiny(ln_scale=True, num_layers=6, num_loops=2, loop_start=2, loop_end=3))
    rms: dict[int, list[float]] = {i: [] for i in range(6)}
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_pre_hook(
            lambda _m, args, i=i: rms[i].append(args[0].pow(2).mean(-1).sqrt().mean().item())
        )
    with torch.no_grad():
        model(tokens(2, 10))
    assert [len(v) for v in rms.values()] == [1, 1, 3, 3, 1, 1]
    for i, values in rms.items():
        assert values == pytest.approx([1 / math.sqrt(i + 1)] * len(values), rel=1e-4)


# -- value embeddings (SPEC §5.11) ----------------------------------------------------------
def test_value_embeddings_are_added_to_v_only_on_the_listed_layers():
    model = randomize(tiny(ve_enabled=True, ve_dim=8, ve_layers="-2,-1"))
    x = tokens(2, 10)
    seen = {}
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_hook(
            lambda m, args, out, i=i: seen.__setitem__(i, (args[0], out[1], m))
        )
    with torch.no_grad():
        model(x)
        ve = model.ve_shared.proj(model.ve_shared.embed.weight[x]) * model.ve_shared.scale
        for i, (inp, values, attn) in seen.items():
            v = attn.c_v(inp)
            if i in (2, 3):
                v = v + ve * model.ve_layer_scales[i - 2]
            torch.testing.assert_close(values, v.reshape(2, 10, 2, 16).transpose(1, 2))
    assert model.ve_shared.embed.weight.shape == (V, 8)
    assert model.ve_shared.proj.weight.shape == (32, 8)  # to Hkv·hd, not model_dim


# -- MLP activation, QK gain (SPEC §5.13, §5.14) --------------------------------------------
def test_leaky_relu_squared_lets_negative_preactivations_through_at_slope_squared():
    model = randomize(tiny(mlp_leaky_slope=0.5, mlp_mult=3.5))
    mlp = model.blocks[0].mlp
    assert mlp.fc.weight.shape == (224, 64)  # float multiplier: int(3.5 · 64)
    x = torch.randn(3, 64)
    with torch.no_grad():
        u = mlp.fc(x)
        expected = mlp.proj(torch.where(u > 0, u, 0.5 * u).square())
        torch.testing.assert_close(mlp(x), expected)
        assert (torch.where(u > 0, u, 0.5 * u).square() - torch.relu(u).square()).abs().max() > 0


def test_qk_gain_starts_at_its_configured_value():
    model = tiny(qk_gain_init=5.0)
    assert all(torch.equal(b.attn.q_gain, torch.full((4,), 5.0)) for b in model.blocks)


# -- orthogonal init (SPEC §5.16) -----------------------------------------------------------
def test_orthogonal_init_with_scaled_aux_projections():
    cfg = dict(model_dim=128, num_heads=2, num_kv_heads=1, bigram_vocab_size=16, bigram_dim=64)
    cfg.update(ve_enabled=True, ve_dim=32, orthogonal_init=True, aux_proj_scaled_init=True)
    model = tiny(**cfg)
    eye = torch.eye(64)
    for block in model.blocks:
        for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
            w = lin.weight if lin.weight.shape[0] <= lin.weight.shape[1] else lin.weight.T
            torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0]), atol=1e-5, rtol=0)
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
    w = model.bigram.proj.weight  # 128×64: columns orthonormal, then ·1/√(2L)
    torch.testing.assert_close(w.T @ w, eye / (2 * TINY.num_layers), atol=1e-5, rtol=0)
    assert not model.ve_shared.proj.weight.any()  # 64×32 < 64: the loop skips it, left zero


def test_without_orthogonal_init_aux_projections_keep_the_default_init_not_a_dead_zero():
    model = tiny(bigram_vocab_size=16, bigram_dim=16)
    assert model.bigram.proj.weight.abs().max() <= 16**-0.5 and model.bigram.proj.weight.any()


# -- U-Net skips, skip gates (SPEC §5.3) ----------------------------------------------------
def test_skip_gates_lerp_between_the_stream_and_the_weighted_skip():
    model = randomize(tiny(num_layers=5, skip_gates=True))
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(
            lambda _m, args, out, i=i: seen.__setitem__(i, (args[0], out[0]))
        )
    with torch.no_grad():
        model(tokens(2, 10))
        g = torch.sigmoid(model.skip_gates[0])
        expected = g * seen[1][1] + (1 - g) * (model.skip_weights[0] * seen[1][1])
    torch.testing.assert_close(seen[2][0], expected)
    assert not tiny(skip_gates=True).skip_gates.any()  # σ(0) = ½ at init


# -- depth recurrence (SPEC §5.28) ----------------------------------------------------------
def test_looped_order_and_encoder_decoder_split_of_s1413():
    order = looped_order(11, 4, 5, 2)
    assert order == (0, 1, 2, 3, 4, 5, 4, 5, 4, 5, 6, 7, 8, 9, 10)
    assert split_encoder_decoder(order) == ((0, 1, 2, 3, 4, 5, 4), (5, 4, 5, 6, 7, 8, 9, 10))
    layout = resolve_layout(cfg_with(num_layers=11, num_loops=2, loop_start=-7, loop_end=-6))
    assert layout.looped == split_encoder_decoder(order)
    assert layout.plain == ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9, 10))
    assert layout.num_skip_weights == 7  # sized for the looped layout


def test_the_model_runs_the_looped_order_only_while_recurrence_is_on():
    model = tiny(num_layers=11, num_loops=2, loop_start=4, loop_end=5)
    assert model.skip_weights.shape == (7, 64)
    calls: list[int] = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda _m, _a, i=i: calls.append(i))
    x = tokens(1, 8)
    with torch.no_grad():
        assert model.recurrence_active  # a fresh model has its full (evaluated) layout
        model(x)
        assert calls == list(looped_order(11, 4, 5, 2))
        calls.clear()
        model.set_recurrence(False)
        model(x)
        assert calls == list(range(11))


# -- parallel residuals (SPEC §5.28) --------------------------------------------------------
def test_parallel_residual_blocks_feed_attention_and_mlp_the_same_normed_input():
    model = randomize(tiny(num_layers=6, parallel_residual_start=-2))
    assert [b.parallel for b in model.blocks] == [False] * 4 + [True] * 2
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        for part in ("attn", "mlp"):
            getattr(block, part).register_forward_pre_hook(
                lambda _m, args, key=(i, part): inputs.__setitem__(key, args[0])
            )
    with torch.no_grad():
        model(tokens(2, 10))
    assert torch.equal(inputs[(4, "attn")], inputs[(4, "mlp")])
    assert not torch.allclose(inputs[(3, "attn")], inputs[(3, "mlp")])
    block = model.blocks[5]
    x, x0 = torch.randn(2, 7, 64), torch.randn(2, 7, 64)
    with torch.no_grad():
        mixed = block.resid_mix[0] * x + block.resid_mix[1] * x0
        n = rms_norm(mixed)
        expected = mixed + block.attn_scale * block.attn(n)[0] + block.mlp_scale * block.mlp(n)
        torch.testing.assert_close(block(x, x0)[0], expected)


# -- value residual learning (P639, SPEC §9.1) ----------------------------------------------
def test_vrl_blends_layer_zeros_values_into_every_later_layer():
    model = randomize(tiny(value_residual=True))
    assert model.blocks[0].attn.vrl_lambda is None
    assert torch.equal(
        tiny(value_residual=True).blocks[1].attn.vrl_lambda, torch.tensor([0.01, 0.99])
    )
    plain = tiny()
    state = {k: v for k, v in model.state_dict().items() if "vrl_lambda" not in k}
    plain.load_state_dict(state)
    x = tokens(2, 12)
    with torch.no_grad():
        for block in model.blocks[1:]:
            block.attn.vrl_lambda.copy_(torch.tensor([0.0, 1.0]))
        torch.testing.assert_close(model(x), plain(x), atol=1e-6, rtol=0)  # λ = (0, 1): no VRL
        model.blocks[1].attn.vrl_lambda.copy_(torch.tensor([1.0, 0.0]))
        before = model(x)
        model.blocks[1].attn.c_v.weight.mul_(3.0)  # layer 1 now attends over layer 0's values
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)


# -- sparse attention output gate (SPEC §5.31) ----------------------------------------------
def test_attention_output_gate_scales_each_head_by_sigma_of_its_window():
    cfg = cfg_with(attn_out_gate=True, attn_out_gate_window=12)
    torch.manual_seed(0)
    gated = randomize(CausalSelfAttention(cfg))
    plain = CausalSelfAttention(TINY)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "gate_w"})
    eye = torch.eye(64)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        gated.proj.weight.copy_(eye)
        plain.proj.weight.copy_(eye)
        g = torch.sigmoid(0.5 * x[..., :12] @ gated.gate_w.T)  # [B, T, H]
        expected = plain(x)[0].reshape(2, 9, 4, 16) * g[..., None]
        torch.testing.assert_close(gated(x)[0], expected.reshape(2, 9, 64))
    assert gated.gate_w.numel() == 4 * 12  # 96 per layer at 8 heads


# -- layer indices and roles ----------------------------------------------------------------
def test_negative_layer_indices_count_from_the_last_layer_and_impossible_ones_raise():
    layout = resolve_layout(
        cfg_with(ve_enabled=True, ve_layers="-2,-1", parallel_residual_start=-1)
    )
    assert layout.ve == (2, 3) and layout.parallel == (3,)
    assert resolve_layout(cfg_with(num_layers=11, ve_enabled=True, ve_layers="9,10")).ve == (9, 10)
    with pytest.raises(PgolfError, match="ve_layers=9"):
        resolve_layout(cfg_with(ve_enabled=True, ve_layers="9,10"))
    with pytest.raises(PgolfError, match="loop_start=-7"):
        resolve_layout(cfg_with(num_loops=2, loop_start=-7, loop_end=-6))
    with pytest.raises(PgolfError, match="parallel_residual_start=-5"):
        resolve_layout(cfg_with(parallel_residual_start=-5))
    assert resolve_layout(TINY).parallel == ()  # the default is off


@pytest.mark.parametrize("aux_role", ["matrix", "scalar"])
def test_new_parameters_carry_the_roles_spec_routes_them_by(aux_role):
    changes = dict(TECHNIQUES["everything"], aux_proj_role=aux_role, ve_dim=16)
    model = tiny(**changes)
    roles = {name: role_of(p) for name, p in model.named_parameters()}
    assert roles["bigram.embed.weight"] == roles["ve_shared.embed.weight"] == "embedding"
    assert roles["bigram.proj.weight"] == roles["ve_shared.proj.weight"] == aux_role
    for name in (
        "bigram.scale",
        "ve_shared.scale",
        "ve_layer_scales.0",
        "smear.gate_w",
        "smear.lam",
        "skip_gates",
        "blocks.1.attn.vrl_lambda",
        "blocks.0.attn.gate_w",
    ):
        assert roles[name] == "scalar", name
    optimizers = build_optimizers(model, TrainConfig(), tie_embeddings=True)
    muon = next(o for o in optimizers if isinstance(o, Muon))
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert (id(model.bigram.proj.weight) in in_muon) == (aux_role == "matrix")
    assert set(params_by_role(model)) == {"matrix", "embedding", "head", "scalar"}
