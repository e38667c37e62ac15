"""The baseline GPT against SPEC §4.1–§4.2: size, causality, init, roles, RoPE, GQA and loss.

With every technique switch at its default the model must stay the baseline bit for bit; a
frozen copy of the first baseline implementation below is the reference for that.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pgolf.config import ModelConfig
from pgolf.model.blocks import Block
from pgolf.model.gpt import GPT, count_parameters
from pgolf.model.layers import Rotary, apply_rotary
from pgolf.model.roles import ROLES, params_by_role, role_of

TINY = ModelConfig(vocab_size=97, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2)


def tiny(**changes) -> GPT:
    torch.manual_seed(0)
    return GPT(dataclasses.replace(TINY, **changes))


def randomize(model: GPT, seed: int = 1, scale: float = 0.1) -> GPT:
    """Move every parameter off its init: zero-init projections would hide attention bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def tokens(b: int, t: int, seed: int = 2, vocab: int = TINY.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# -- a frozen copy of the baseline as first committed (fab7d68), the bit-identity reference -----
class _RefLinear(torch.nn.Linear):
    def __init__(self, n_in: int, n_out: int, zero: bool = False):
        super().__init__(n_in, n_out, bias=False)
        if zero:
            torch.nn.init.zeros_(self.weight)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def _ref_rope(x, t):
    hd = x.size(-1)
    inv_freq = 1.0 / (10_000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = torch.outer(torch.arange(t, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos()[None, None].to(x.dtype), angles.sin()[None, None].to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class _RefAttention(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, self.h, self.kv = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        self.hd = d // self.h
        self.c_q, self.c_k = _RefLinear(d, d), _RefLinear(d, self.kv * self.hd)
        self.c_v, self.proj = _RefLinear(d, self.kv * self.hd), _RefLinear(d, d, zero=True)
        self.q_gain = torch.nn.Parameter(torch.full((self.h,), cfg.qk_gain_init))

    def forward(self, x):
        b, t, d = x.shape
        q = self.c_q(x).reshape(b, t, self.h, self.hd).transpose(1, 2)
        k = self.c_k(x).reshape(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.c_v(x).reshape(b, t, self.kv, self.hd).transpose(1, 2)
        q, k = F.rms_norm(q, (self.hd,)), F.rms_norm(k, (self.hd,))
        q, k = _ref_rope(q, t), _ref_rope(k, t)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.h)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


def _ref_norm(z):
    return F.rms_norm(z, (z.size(-1),))


class _RefBlock(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hidden = cfg.model_dim, int(cfg.mlp_mult * cfg.model_dim)
        self.attn = _RefAttention(cfg)
        self.mlp = torch.nn.Module()
        self.mlp.fc, self.mlp.proj = _RefLinear(d, hidden), _RefLinear(hidden, d, zero=True)
        self.attn_scale = torch.nn.Parameter(torch.ones(d))
        self.mlp_scale = torch.nn.Parameter(torch.ones(d))
        self.resid_mix = torch.nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))

    def forward(self, x, x0):
        norm = _ref_norm
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(norm(x))
        h = torch.relu(self.mlp.fc(norm(x))).square()
        return x + self.mlp_scale.to(x.dtype) * self.mlp.proj(h)


class _RefGPT(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.enc = cfg.num_layers // 2
        self.tok_emb = torch.nn.Embedding(cfg.vocab_size, cfg.model_dim)
        n_skip = min(self.enc, cfg.num_layers - self.enc)
        self.skip_weights = torch.nn.Parameter(torch.ones(n_skip, cfg.model_dim))
        self.blocks = torch.nn.ModuleList(_RefBlock(cfg) for _ in range(cfg.num_layers))
        torch.nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)

    def forward(self, ids):
        x = F.rms_norm(self.tok_emb(ids), (self.tok_emb.embedding_dim,))
        x0, skips = x, []
        for block in self.blocks[: self.enc]:
            x = block(x, x0)
            skips.append(x)
        for i, block in enumerate(self.blocks[self.enc :]):
            if i < len(self.skip_weights):
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = block(x, x0)
        z = F.linear(F.rms_norm(x, (x.size(-1),)), self.tok_emb.weight.to(x.dtype))
        return (30.0 * torch.tanh(z / 30.0)).float()


@pytest.mark.parametrize("num_layers", [4, 5])
def test_default_switches_reproduce_the_reference_baseline_bit_for_bit(num_layers):
    cfg = dataclasses.replace(TINY, num_layers=num_layers)
    torch.manual_seed(0)
    ref = _RefGPT(cfg)
    torch.manual_seed(0)
    new = GPT(cfg)
    ref_state, new_state = ref.state_dict(), new.state_dict()
    assert list(new_state) == list(ref_state)  # same names, same order
    assert all(torch.equal(new_state[k], ref_state[k]) for k in ref_state)  # same seed → same init
    randomize(new)
    ref.load_state_dict(new.state_dict())
    x, y = tokens(2, 24), tokens(2, 24, seed=3)
    losses = []
    for model in (ref, new):
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        losses.append((logits, loss))
    assert torch.equal(losses[0][0], losses[1][0]) and torch.equal(losses[0][1], losses[1][1])
    ref_params = dict(ref.named_parameters())
    for name, p in new.named_parameters():
        assert torch.equal(p.grad, ref_params[name].grad), name


def test_a_block_with_every_switch_off_is_the_reference_block_bit_for_bit():
    # In particular XSA off: the attention output is the plain SDPA output, untouched.
    torch.manual_seed(0)
    ref = _RefBlock(TINY)
    new = Block(TINY, layer_idx=3, xsa=False)
    randomize(new)
    ref.load_state_dict(new.state_dict())
    x, x0 = torch.randn(2, 16, TINY.model_dim), torch.randn(2, 16, TINY.model_dim)
    assert torch.equal(new(x, x0)[0], ref(x, x0))


def test_baseline_config_has_the_official_parameter_count():
    with torch.device("meta"):
        model = GPT(ModelConfig())
    assert count_parameters(model) == 17_059_912  # BASE/train.log


def test_state_dict_uses_the_official_names_and_holds_no_rope_tables():
    names = set(tiny(num_layers=2).state_dict())
    block = {"attn_scale", "mlp_scale", "resid_mix", "attn.q_gain", "attn.c_q.weight"}
    block |= {"attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight"}
    block |= {"mlp.fc.weight", "mlp.proj.weight"}
    per_block = {f"blocks.{i}.{n}" for i in (0, 1) for n in block}
    expected = {"tok_emb.weight", "skip_weights"} | per_block
    assert names == expected


def test_same_seed_gives_the_same_initial_weights():
    a, b = tiny().state_dict(), tiny().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_logits_at_a_position_ignore_every_later_token(num_kv_heads):
    model = randomize(tiny(num_kv_heads=num_kv_heads)).eval()
    x = tokens(2, 24)
    with torch.no_grad():
        base = model(x)
        for t in (0, 5, 11, 22):
            changed = x.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + t) % TINY.vocab_size
            out = model(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
            # ...while the changed positions do see the change (the check above is not vacuous).
            assert not torch.allclose(out[:, t + 1], base[:, t + 1], atol=1e-4)


def _blockless_logits(model: GPT, x: torch.Tensor) -> torch.Tensor:
    emb = model.tok_emb.weight
    z = F.rms_norm(F.rms_norm(emb[x], (emb.size(1),)), (emb.size(1),)) @ emb.T
    cap = model.cfg.logit_softcap
    return cap * torch.tanh(z / cap)


def test_fresh_single_block_is_exactly_the_identity():
    # resid_mix = (1, 0) and zero-init attn/MLP projections leave x untouched, bit for bit.
    model = tiny(num_layers=1)
    x = tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(model(x), _blockless_logits(model, x))


def test_fresh_unet_only_rescales_the_stream():
    # With identity blocks each skip adds a copy of x, so the stream is k·x and the final
    # RMSNorm removes k: equal up to rounding.
    model = tiny(num_layers=5)
    x = tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _blockless_logits(model, x), atol=1e-6, rtol=1e-5)


def test_decoder_blocks_receive_the_mirrored_encoder_outputs():
    # L = 5: encoder blocks 0, 1; decoder 2, 3, 4. Block 2 gets block 1's output, block 3 gets
    # block 0's, block 4 gets no skip.
    model = randomize(tiny(num_layers=5))
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, block in enumerate(model.blocks):
        # A block returns (stream, its attention values); the stream is what the U-Net passes on.
        block.register_forward_hook(
            lambda _m, args, out, i=i: seen.__setitem__(i, (args[0], out[0]))
        )
    with torch.no_grad():
        model(tokens(2, 10))
    w = model.skip_weights
    torch.testing.assert_close(seen[2][0], seen[1][1] + w[0] * seen[1][1])
    torch.testing.assert_close(seen[3][0], seen[2][1] + w[1] * seen[0][1])
    assert torch.equal(seen[4][0], seen[3][1])


def test_initial_values_follow_the_spec():
    model = tiny(tie_embeddings=False)
    block = model.blocks[0]
    assert torch.equal(block.resid_mix, torch.stack((torch.ones(64), torch.zeros(64))))
    assert torch.equal(block.attn.q_gain, torch.full((4,), TINY.qk_gain_init))
    assert torch.equal(model.skip_weights, torch.ones(2, 64))
    for zeroed in (block.attn.proj.weight, block.mlp.proj.weight, model.lm_head.weight):
        assert not zeroed.any()
    assert block.attn.c_q.weight.abs().max() <= 64**-0.5  # Kaiming-uniform bound 1/sqrt(fan_in)
    tied = tiny(vocab_size=4096, model_dim=256, num_heads=4, num_kv_heads=4)
    assert tied.tok_emb.weight.std().item() == pytest.approx(TINY.tied_embed_init_std, rel=0.02)


@pytest.mark.parametrize("tie", [True, False])
def test_every_parameter_has_the_expected_role(tie):
    model = tiny(tie_embeddings=tie)
    groups = params_by_role(model)  # raises if any parameter lacks a role
    counts = {role: len(groups[role]) for role in ROLES}
    L = TINY.num_layers
    assert counts == {"matrix": 6 * L, "embedding": 1, "head": 0 if tie else 1, "scalar": 4 * L + 1}
    assert all(p.ndim == 2 for _, p in groups["matrix"])
    assert role_of(model.tok_emb.weight) == "embedding"
    if not tie:
        assert role_of(model.lm_head.weight) == "head"


def test_logits_never_exceed_the_softcap():
    model = randomize(tiny(), scale=2.0)
    x = tokens(2, 16)
    with torch.no_grad():
        capped = model(x)
        model.logit_softcap = 0.0  # <= 0 turns the cap off
        raw = model(x)
    assert capped.dtype == torch.float32 and capped.shape == (2, 16, TINY.vocab_size)
    assert raw.abs().max() > TINY.logit_softcap  # the cap is actually exercised
    assert capped.abs().max() <= TINY.logit_softcap
    torch.testing.assert_close(capped, 30.0 * torch.tanh(raw / 30.0))


def test_gqa_equals_mha_with_each_kv_head_shared_by_its_query_group():
    gqa = randomize(tiny(num_kv_heads=2))
    mha = tiny(num_kv_heads=4)
    state = gqa.state_dict()
    head_dim = TINY.model_dim // TINY.num_heads
    for name in list(state):
        if name.endswith(("c_k.weight", "c_v.weight")):
            # query heads 0,1 read kv head 0 and heads 2,3 read kv head 1 (repeat_interleave).
            per_head = state[name].reshape(2, head_dim, -1)
            state[name] = per_head.repeat_interleave(2, dim=0).reshape(4 * head_dim, -1)
    mha.load_state_dict(state)
    x = tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(mha(x), gqa(x), atol=1e-5, rtol=1e-5)


def test_rope_is_identity_at_position_zero_and_pairs_dim_j_with_j_plus_half():
    hd = 16
    rotary = Rotary(hd, base=10_000.0)
    cos, sin = rotary(8, torch.float32)
    q = torch.randn(1, 2, 8, hd)
    out = apply_rotary(q, cos, sin)
    assert torch.equal(out[:, :, 0], q[:, :, 0])
    # A vector on dim j only moves within the plane (j, j + hd/2), by angle p·base^(-2j/hd).
    j, p = 3, 5
    e = torch.zeros(1, 1, 8, hd)
    e[..., j] = 1.0
    rotated = apply_rotary(e, cos, sin)[0, 0, p]
    angle = torch.tensor(p * 10_000.0 ** (-2 * j / hd))
    expected = torch.zeros(hd)
    expected[j], expected[j + hd // 2] = torch.cos(angle), -torch.sin(angle)  # upstream's sign
    torch.testing.assert_close(rotated, expected)


def test_rope_scores_depend_only_on_relative_position():
    hd = 32
    cos, sin = Rotary(hd, base=10_000.0)(40, torch.float64)
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)
    q_all = apply_rotary(q.expand(1, 1, 40, hd), cos, sin)[0, 0]
    k_all = apply_rotary(k.expand(1, 1, 40, hd), cos, sin)[0, 0]
    for m, n in ((7, 3), (30, 26), (4, 0)):
        torch.testing.assert_close(q_all[m] @ k_all[n], q_all[m - n] @ k_all[0])


def test_loss_is_the_mean_cross_entropy_of_the_logits():
    model = randomize(tiny())
    x, y = tokens(3, 12, seed=5), tokens(3, 12, seed=6)
    with torch.no_grad():
        logp = torch.log_softmax(model(x).double(), dim=-1)
        manual = -logp.gather(-1, y[..., None])[..., 0]
        per_token = model.loss(x, y, reduction="none")
        mean = model.loss(x, y)
    assert per_token.shape == (3, 12)
    torch.testing.assert_close(per_token.double(), manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, per_token.mean())


def test_forward_traces_as_one_graph():
    # The trainer compiles with fullgraph=True; a graph break here would fail it on GPU.
    model = tiny()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    x = tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
