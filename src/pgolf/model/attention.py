"""Causal self-attention and its switches: XSA, value residuals, value embeddings, output gate.

Baseline (SPEC §4.1): GQA attention with q/k RMSNorm, RoPE and a learned per-head query gain.
Switches, each off by default: XSA (§5.4), partial/NTK RoPE (§5.9), value embeddings added to V
(§5.11), VRL blending with layer 0's values (§9.1), sparse per-head output gate and attention
restricted to each document (§5.31, `pgolf.model.doc_mask`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.errors import PgolfError
from pgolf.model.config import ModelConfig
from pgolf.model.decode import LayerCache
from pgolf.model.doc_mask import Documents, document_attention
from pgolf.model.layers import CastedLinear, Rotary, apply_rotary, rms_norm
from pgolf.model.precision import precision_on
from pgolf.model.roles import with_role

# VRL's (λ_layer0, λ_own) at init (P639): almost the layer's own values, a trace of layer 0's.
VRL_INIT = (0.01, 0.99)


def _scalar(values: Tensor) -> nn.Parameter:
    return with_role(nn.Parameter(values.float()), "scalar")


def exclude_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: remove from each head's output its component along the same position's own value.

    y: [B, H, T, hd] attention outputs; v: [B, Hkv, T, hd] the values the heads attended over.
    Query head h reads kv head h // (H/Hkv) (SDPA's GQA grouping), so y is viewed as
    [B, Hkv, H/Hkv, T, hd] and the normalised value broadcast over the group; materialising
    repeated values (repeat_interleave) would cost memory for nothing.
    """
    b, h, t, hd = y.shape
    kv = v.size(1)
    y = y.reshape(b, kv, h // kv, t, hd)
    v_hat = F.normalize(v, dim=-1).unsqueeze(2)
    y = y - (y * v_hat).sum(dim=-1, keepdim=True) * v_hat
    return y.reshape(b, h, t, hd)


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, *, gqa: bool) -> Tensor:
    """SDPA where the queries are the last q.size(-2) of the k.size(-2) positions.

    enable_gqa (torch >= 2.5) lets each group of query heads share a kv head without
    materialising repeated k/v; default scale is 1/sqrt(hd). SDPA's own causal mask is aligned
    top-left, right only when queries and keys are the same positions.
    """
    tq, tk = q.size(-2), k.size(-2)
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # A single new query may see every cached key; a chunk needs the causal mask shifted right.
    mask = None
    if tq > 1:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    """GQA attention; `forward` returns (output, the values before any VRL blend)."""

    def __init__(self, cfg: ModelConfig, *, xsa: bool = False, value_residual: bool = False):
        super().__init__()
        dim = cfg.model_dim
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = dim // cfg.num_heads
        kv_dim = cfg.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_dim)
        self.c_v = CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        # q·k of two RMS-normed vectors is bounded by hd, so without a gain the softmax would be
        # nearly flat at init; q_gain (per head) sets that temperature and is learned.
        self.q_gain = _scalar(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        rope_dims = cfg.rope_dims or self.head_dim
        if rope_dims % 2 or not 0 < rope_dims <= self.head_dim:
            raise PgolfError(f"model.rope_dims={cfg.rope_dims}: must be even and ≤ the head dim")
        self.rotary = Rotary(
            rope_dims,
            cfg.rope_base,
            cfg.rope_train_seq_len,
            bf16=precision_on(cfg.rope_bf16, "model.rope_bf16"),
        )
        self.use_xsa = xsa
        self.vrl_lambda = _scalar(torch.tensor(VRL_INIT)) if value_residual else None
        self.gate_window = cfg.attn_out_gate_window
        self.gate_w = None
        if cfg.attn_out_gate:
            if not 0 < self.gate_window <= dim:
                raise PgolfError(f"model.attn_out_gate_window must be in 1..{dim}")
            # Zero weights: every head starts at σ(0) = 0.5 (SPEC §5.31's formula has no offset).
            self.gate_w = _scalar(torch.zeros(cfg.num_heads, self.gate_window))

    def forward(
        self,
        x: Tensor,
        ve: Tensor | None = None,
        v0: Tensor | None = None,
        cache: LayerCache | None = None,
        docs: Documents | None = None,
    ) -> tuple[Tensor, Tensor]:
        """With a cache, x holds only the positions after the cached ones (`pgolf.model.decode`);
        with `docs`, each position attends only within its document."""
        b, t, d = x.shape
        q = self.c_q(x).reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x)
        if ve is not None:
            # Value embeddings join V before it is split into heads (SPEC §5.11).
            v = v + ve
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        own_v = v
        if self.vrl_lambda is not None and v0 is not None:
            lam = self.vrl_lambda.to(v.dtype)
            v = lam[0] * v0 + lam[1] * v
        q, k = rms_norm(q), rms_norm(k)
        if cache is None:
            cos, sin = self.rotary(t, q.dtype)
            k, v_all = apply_rotary(k, cos, sin), v
        else:
            cos, sin, k, v_all = cache.extend(k, v, self.rotary)
        q = apply_rotary(q, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        gqa = self.num_kv_heads != self.num_heads
        if docs is None:
            y = _causal_attention(q, k, v_all, gqa=gqa)
        else:
            y = document_attention(q, k, v_all, docs, gqa=gqa)
        if self.use_xsa:
            # Against the values actually attended over (VRL-blended when on), as P639 does.
            y = exclude_self_value(y, v)
        if self.gate_w is not None:
            logits = F.linear(x[..., : self.gate_window], self.gate_w.to(x.dtype))
            y = y * torch.sigmoid(0.5 * logits).transpose(1, 2)[..., None]
        return self.proj(y.transpose(1, 2).reshape(b, t, d)), own_v
