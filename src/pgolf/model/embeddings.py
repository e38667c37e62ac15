"""Extra input-side embeddings of the sp1024 stacks: BigramHash, SmearGate, value embeddings.

All three only look at the current and earlier tokens, so the model stays causal (SPEC §5.7,
§5.8, §5.11). Tables are `embedding`-role parameters (the token-Adam group, SPEC §5.8/§5.11),
their projections take the role the config names (Muon or scalar Adam), gains are scalars.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.errors import PgolfError
from pgolf.model.config import ModelConfig
from pgolf.model.layers import CastedLinear
from pgolf.model.roles import with_role

# The records' hash multipliers (SPEC §5.8); the trigram one is S1019's optional term.
BIGRAM_MUL_CUR, BIGRAM_MUL_PREV, TRIGRAM_MUL = 36313, 27191, 51497


def _scalar(values: Tensor) -> nn.Parameter:
    return with_role(nn.Parameter(values.float()), "scalar")


def bigram_buckets(tokens: Tensor, num_buckets: int, trigram: bool = False) -> Tensor:
    """Bucket of every position: ((36313·t) XOR (27191·t₋₁) [XOR 51497·t₋₂]) mod (K−1).

    int32 arithmetic on purpose: the records hash in int32, so for token ids above ~59,000 the
    products wrap exactly as theirs do; torch's `%` is floored, so buckets stay in [0, K−2].
    Position 0 of every sequence has no previous token and gets the reserved bucket K−1. With
    the trigram term, position 1 has no t₋₂ and hashes as a plain bigram (an XOR with zero).
    """
    t = tokens.to(torch.int32)
    mod = num_buckets - 1
    mixed = torch.bitwise_xor(BIGRAM_MUL_CUR * t[..., 1:], BIGRAM_MUL_PREV * t[..., :-1])
    if trigram:
        before = TRIGRAM_MUL * t[..., :-2]
        mixed = torch.cat((mixed[..., :1], torch.bitwise_xor(mixed[..., 1:], before)), dim=-1)
    first = torch.full_like(t[..., :1], mod)
    return torch.cat((first, mixed % mod), dim=-1).long()


class BigramHashEmbedding(nn.Module):
    """K×D table of hashed (previous, current) token pairs → D→d projection → ·learned scale.

    Added to the token embedding before the embedding RMSNorm (SPEC §5.8). The table starts at
    zero; the projection's zero-init is overwritten by the generic init in every record (see
    `pgolf.model.init`), which is why it is left to that init here.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_buckets = cfg.bigram_vocab_size
        self.trigram = cfg.bigram_trigram
        if self.num_buckets < 2:
            raise PgolfError("model.bigram_vocab_size must be ≥ 2 (bucket K−1 is reserved)")
        self.embed = nn.Embedding(cfg.bigram_vocab_size, cfg.bigram_dim)
        nn.init.zeros_(self.embed.weight)
        with_role(self.embed.weight, "embedding")
        self.proj = None
        if cfg.bigram_dim != cfg.model_dim:
            self.proj = CastedLinear(cfg.bigram_dim, cfg.model_dim, role=cfg.aux_proj_role)
        self.scale = _scalar(torch.tensor(0.05))

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.embed(bigram_buckets(input_ids, self.num_buckets, self.trigram))
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(h.dtype)


class SmearGate(nn.Module):
    """v1: x_t ← (1 − σ(g))·x_t + σ(g)·x_{t−1}, per channel, g = 0 at init (SPEC §5.7).

    Faithful to S414…S1060, it also smears the previous document's last token into a BOS.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = _scalar(torch.zeros(cfg.model_dim))

    def forward(self, x: Tensor, input_ids: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))
        prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)
        return (1 - g) * x + g * prev


class BosSmearGate(nn.Module):
    """v2: x_t ← x_t + λ·σ(w·x_t[:window])·x_{t−1}·[token_t ≠ BOS] (PR #1667 → TOP, SPEC §5.7).

    λ = 0 and w = 0 at init, so the module starts as the identity. The mask stops the last token
    of one document from leaking into the next document's BOS. TOP applies it to the raw token
    embedding, before the embedding norm (the GPT places it there).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not 0 < cfg.smear_window <= cfg.model_dim:
            raise PgolfError(f"model.smear_window must be in 1..model_dim ({cfg.model_dim})")
        self.window = cfg.smear_window
        self.bos_id = cfg.bos_id
        self.gate_w = _scalar(torch.zeros(1, cfg.smear_window))
        self.lam = _scalar(torch.zeros(()))

    def forward(self, x: Tensor, input_ids: Tensor) -> Tensor:
        # Position 0 has no previous token and is left as it is. The ops are TOP's, in its order:
        # a zero-padded row or another order of the slices sums the gradients (of λ, of the
        # embedding) in another order, which rounds apart.
        gate_in = x[:, 1:, : self.window].contiguous()
        gate = self.lam.to(x.dtype) * torch.sigmoid(F.linear(gate_in, self.gate_w.to(x.dtype)))
        not_bos = (input_ids[:, 1:] != self.bos_id).to(x.dtype)[..., None]
        return torch.cat((x[:, :1], x[:, 1:] + gate * x[:, :-1] * not_bos), dim=1)


def build_smear_gate(cfg: ModelConfig) -> nn.Module | None:
    kinds = {"off": None, "v1": SmearGate, "v2": BosSmearGate}
    if cfg.smear_gate not in kinds:
        raise PgolfError(f"model.smear_gate={cfg.smear_gate!r}: expected one of {list(kinds)}")
    kind = kinds[cfg.smear_gate]
    return None if kind is None else kind(cfg)


class ValueEmbedding(nn.Module):
    """One shared V×ve_dim table → projection to the K/V width → ·learned scale (SPEC §5.11).

    Computed once per forward; each listed layer adds it, times its own scalar, to its values.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kv_dim = cfg.num_kv_heads * (cfg.model_dim // cfg.num_heads)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.ve_dim)
        nn.init.normal_(self.embed.weight, std=0.01)
        with_role(self.embed.weight, "embedding")
        self.proj = None
        if cfg.ve_dim != kv_dim:
            self.proj = CastedLinear(cfg.ve_dim, kv_dim, role=cfg.aux_proj_role)
        self.scale = _scalar(torch.tensor(0.1))

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.embed(input_ids)
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(h.dtype)
