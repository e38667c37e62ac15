"""The official Parameter Golf baseline GPT (SPEC §4.1–§4.2), parameter for parameter.

Parameter names match the official `train_gpt.py` (`tok_emb.weight`, `blocks.3.attn.c_q.weight`,
`skip_weights`, ...), so state dicts and quantized artifacts move between the two unchanged, and
the construction order matches too, so the same seed gives the same initial weights. Every
parameter carries a role (`pgolf.model.roles`) that optimizers and quantizers dispatch on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.config import ModelConfig
from pgolf.model.layers import CastedLinear, Rotary, apply_rotary, rms_norm
from pgolf.model.roles import with_role


def _scalar(values: Tensor) -> nn.Parameter:
    return with_role(nn.Parameter(values.float()), "scalar")


class CausalSelfAttention(nn.Module):
    """GQA attention with q/k RMSNorm, full-dim RoPE and a learned per-head query gain."""

    def __init__(self, cfg: ModelConfig):
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
        self.rotary = Rotary(self.head_dim, cfg.rope_base)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q = self.c_q(x).reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(t, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        # enable_gqa (torch >= 2.5) lets each group of query heads share a kv head without
        # materialising repeated k/v; default scale is 1/sqrt(hd).
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """relu² MLP: proj(relu(fc(x))²)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden)
        self.proj = CastedLinear(hidden, cfg.model_dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    """Pre-norm block that first re-mixes in the embedding stream x0 (per channel, learned)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.model_dim
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.attn_scale = _scalar(torch.ones(d))
        self.mlp_scale = _scalar(torch.ones(d))
        # row 0 weighs the running stream, row 1 the embedding; (1, 0) starts as a plain residual.
        self.resid_mix = _scalar(torch.stack((torch.ones(d), torch.zeros(d))))

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class GPT(nn.Module):
    """Embedding → L blocks with U-Net skips (first half encoder, rest decoder) → tied head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.logit_softcap = cfg.logit_softcap
        self.num_encoder_layers = cfg.num_layers // 2
        self.num_decoder_layers = cfg.num_layers - self.num_encoder_layers
        self.num_skip_weights = min(self.num_encoder_layers, self.num_decoder_layers)
        # Built in the official order (embedding, skips, blocks, head, then the embedding's
        # re-init) so that one seed yields the same initial weights as upstream.
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        with_role(self.tok_emb.weight, "embedding")
        self.skip_weights = _scalar(torch.ones(self.num_skip_weights, cfg.model_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = CastedLinear(cfg.model_dim, cfg.vocab_size, role="head", zero_init=True)
        # Only the tied embedding gets the small std (it doubles as the output head, where N(0, 1)
        # would give huge initial logits); an untied embedding keeps nn.Embedding's N(0, 1).
        if cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.tied_embed_init_std)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Soft-capped logits, float32, [B, T, V]."""
        x = rms_norm(self.tok_emb(input_ids))
        x0 = x
        skips: list[Tensor] = []
        for block in self.blocks[: self.num_encoder_layers]:
            x = block(x, x0)
            skips.append(x)
        for i, block in enumerate(self.blocks[self.num_encoder_layers :]):
            # The stack pairs the last encoder output with the first decoder block, like a U-Net;
            # with an odd L the last decoder block has no partner.
            if i < self.num_skip_weights:
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = block(x, x0)
        x = rms_norm(x)
        if self.lm_head is None:
            z = F.linear(x, self.tok_emb.weight.to(x.dtype))
        else:
            z = self.lm_head(x)
        if self.logit_softcap > 0:
            # Capped in the compute dtype, then widened, exactly as upstream does before its loss.
            z = self.logit_softcap * torch.tanh(z / self.logit_softcap)
        return z.float()

    def loss(self, input_ids: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy in nats; reduction "none" gives one loss per target, shaped as targets."""
        logits = self(input_ids)
        losses = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction
        )
        return losses.reshape(targets.shape) if reduction == "none" else losses


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, each shared tensor counted once (as upstream logs it)."""
    return sum(p.numel() for p in model.parameters())
