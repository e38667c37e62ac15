"""One transformer block: re-mix the embedding stream in, then attention and MLP (SPEC §4.1).

Switches: layer-wise LN scale 1/√(i+1) on both norm outputs, i the *physical* index even when the
block runs several times under depth recurrence (§5.10); GPT-J parallel residuals, where attention
and MLP read the same normed input and both add to the stream (§5.28); TOP's two lanes, where
attention and MLP each read a lane of their own (`branches`; the GPT mixes the lanes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pgolf.model.attention import CausalSelfAttention
from pgolf.model.config import ModelConfig
from pgolf.model.decode import LayerCache
from pgolf.model.doc_mask import Documents
from pgolf.model.layers import rms_norm
from pgolf.model.mlp import MLP
from pgolf.model.roles import with_role


def _scalar(values: Tensor) -> nn.Parameter:
    return with_role(nn.Parameter(values.float()), "scalar")


class Block(nn.Module):
    """Pre-norm block; `forward` returns (new stream, this layer's attention values for VRL)."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        *,
        xsa: bool = False,
        value_residual: bool = False,
        parallel: bool = False,
    ):
        super().__init__()
        d = cfg.model_dim
        self.attn = CausalSelfAttention(cfg, xsa=xsa, value_residual=value_residual)
        self.mlp = MLP(cfg)
        self.attn_scale = _scalar(torch.ones(d))
        self.mlp_scale = _scalar(torch.ones(d))
        # row 0 weighs the running stream, row 1 the embedding; (1, 0) starts as a plain residual.
        self.resid_mix = _scalar(torch.stack((torch.ones(d), torch.zeros(d))))
        # A constant, not a parameter: deeper layers start with smaller branch inputs.
        self.ln_scale = 1.0 / math.sqrt(layer_idx + 1) if cfg.ln_scale else 1.0
        self.parallel = parallel

    def _norm(self, x: Tensor) -> Tensor:
        n = rms_norm(x)
        return n * self.ln_scale if self.ln_scale != 1.0 else n

    def forward(
        self,
        x: Tensor,
        x0: Tensor,
        ve: Tensor | None = None,
        v0: Tensor | None = None,
        cache: LayerCache | None = None,
        docs: Documents | None = None,
    ) -> tuple[Tensor, Tensor]:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        n = self._norm(x)
        attn_out, values = self.attn(n, ve, v0, cache, docs)
        if self.parallel:
            mlp_out = self.mlp(n)
            x = x + self.attn_scale.to(x.dtype) * attn_out
            return x + self.mlp_scale.to(x.dtype) * mlp_out, values
        x = x + self.attn_scale.to(x.dtype) * attn_out
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self._norm(x)), values

    def branches(
        self,
        attn_lane: Tensor,
        mlp_lane: Tensor,
        x0: Tensor,
        ve: Tensor | None = None,
        v0: Tensor | None = None,
        cache: LayerCache | None = None,
        docs: Documents | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(scaled attention output, scaled MLP output, values) for TOP's two-lane decoder.

        Only the attention lane is re-mixed with the embedding stream; the MLP reads its lane as
        it is. Neither output is added here: the GPT decides how much of each reaches each lane.
        """
        mix = self.resid_mix.to(attn_lane.dtype)
        attn_in = mix[0] * attn_lane + mix[1] * x0
        attn_out, values = self.attn(self._norm(attn_in), ve, v0, cache, docs)
        mlp_out = self.mlp(self._norm(mlp_lane))
        return (
            self.attn_scale.to(attn_out.dtype) * attn_out,
            self.mlp_scale.to(mlp_out.dtype) * mlp_out,
            values,
        )
