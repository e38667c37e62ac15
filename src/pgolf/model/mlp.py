"""The feed-forward block: proj(act(fc(x))²) with a float width multiplier (SPEC §4.1, §5.2, §5.13).

relu² is the baseline; LeakyReLU(slope)² (slope 0.5 from S549 on) lets negative pre-activations
contribute slope²·u² instead of dying, reported −0.0021 BPB (S549 ablation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.config import ModelConfig
from pgolf.model.layers import CastedLinear


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # int() truncates like upstream: 3.5 × 512 = 1792, 4 × 512 = 2048.
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden)
        self.proj = CastedLinear(hidden, cfg.model_dim, zero_init=True)
        self.leaky_slope = cfg.mlp_leaky_slope

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        # slope 0 keeps the baseline's exact kernel (leaky_relu(·, 0) would give −0.0 entries).
        h = torch.relu(h) if self.leaky_slope == 0 else F.leaky_relu(h, self.leaky_slope)
        return self.proj(h.square())
