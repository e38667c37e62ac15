"""Parameter-level building blocks of the baseline GPT (SPEC §4.1–§4.3).

`CastedLinear` (fp32 master weights, matmul in the activation dtype) and rotary position
embeddings. They live apart from the model assembly so that later techniques (partial RoPE, NTK
scaling, other inits) can replace one part without touching `gpt.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.roles import with_role


def rms_norm(x: Tensor) -> Tensor:
    """Parameter-free RMSNorm over the last dim; eps is the dtype default, as upstream."""
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Bias-free linear layer whose weight is cast to the input's dtype at matmul time.

    The weight stays fp32 so that optimizer updates are not rounded to bf16 (SPEC §4.3); under
    CUDA autocast the input is bf16 and the matmul runs in bf16. On CPU everything is fp32.
    """

    def __init__(
        self, in_features: int, out_features: int, *, role: str = "matrix", zero_init: bool = False
    ):
        # nn.Linear's own reset draws Kaiming-uniform even for zero-init layers; keeping that draw
        # keeps the RNG stream, and so every later init, identical to the official script's.
        super().__init__(in_features, out_features, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)
        with_role(self.weight, role)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    """cos/sin tables for RoPE over the full head dim, cached for the last sequence length seen.

    `inv_freq` is a non-persistent buffer, like upstream's: it follows `.to(device)` and is not
    saved. It also follows `.bfloat16()`; the official script casts the whole model that way, so
    its tables (positions included) are computed in bf16, where positions above 256 round to even
    numbers. Reproducing that is the trainer's choice, not this module's.
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        self.register_buffer("inv_freq", 1.0 / (base**exponents), persistent=False)
        self._cached_key: tuple[int, torch.device, torch.dtype] | None = None
        self._cos: Tensor | None = None
        self._sin: Tensor | None = None

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(cos, sin), each [1, 1, seq_len, head_dim // 2], in `dtype`."""
        inv_freq = self.inv_freq
        key = (seq_len, inv_freq.device, inv_freq.dtype)
        if self._cached_key != key or self._cos is None or self._sin is None:
            positions = torch.arange(seq_len, device=inv_freq.device, dtype=inv_freq.dtype)
            angles = torch.outer(positions, inv_freq)
            self._cos = angles.cos()[None, None]
            self._sin = angles.sin()[None, None]
            self._cached_key = key
        return self._cos.to(dtype), self._sin.to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE: dim j is paired with dim j + hd/2 (not interleaved pairs).

    The sign (first half gets `+ x2·sin`) is the official script's; the opposite sign would be an
    equally valid RoPE but would not reproduce its checkpoints.
    """
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
