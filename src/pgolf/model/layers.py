"""Parameter-level building blocks (SPEC §4.1–§4.3, §5.9): RMSNorm, CastedLinear, rotary tables.

`CastedLinear` (fp32 master weights, matmul in the activation dtype) and rotary position
embeddings, full or partial (the first R dims of each head), with NTK rescaling above a nominal
length. They live apart from the model assembly so techniques can replace one part without
touching `gpt.py`.
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
    `zero_init` layers (the residual-branch outputs) stay zero under every init scheme.
    """

    def __init__(
        self, in_features: int, out_features: int, *, role: str = "matrix", zero_init: bool = False
    ):
        # nn.Linear's own reset draws Kaiming-uniform even for zero-init layers; keeping that draw
        # keeps the RNG stream, and so every later init, identical to the official script's.
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        if zero_init:
            nn.init.zeros_(self.weight)
        with_role(self.weight, role)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def ntk_base(base: float, seq_len: int, nominal_len: int, rotated_dims: int) -> float:
    """NTK-aware base for a length above the nominal one: base·(T/T0)^(r/(r−2)) (SPEC §5.9).

    Stretching the base instead of the positions keeps the fastest pair's rotation per token
    almost unchanged while slowing the slow pairs enough that T positions fit where T0 did.
    At or below the nominal length (or with no nominal length) the base is unchanged.
    """
    if nominal_len <= 0 or seq_len <= nominal_len:
        return base
    return base * (seq_len / nominal_len) ** (rotated_dims / (rotated_dims - 2))


class Rotary(nn.Module):
    """cos/sin tables for RoPE over the first `dims` dims of a head, cached per sequence length.

    `dims` is the head dim for full RoPE or R for partial RoPE (the rest of the head gets no
    position signal). With `nominal_len` > 0, lengths above it use the NTK base; the sp1024
    stacks hard-wire 1024 while training at 2048, so their rescale is always on (SPEC §5.9).

    `inv_freq` is a non-persistent fp32 buffer, like upstream's before its cast: it follows
    `.to(device)` and is not saved. Every official script casts its whole model with
    `.bfloat16()`, buffer included, so its un-rescaled tables are computed in bf16 (inv_freq
    rounded, positions above 256 rounded to even numbers, above 512 to multiples of 4, ...),
    while rescaled ones are rebuilt from fp32 each time. `bf16=True` reproduces exactly that.
    """

    def __init__(self, dims: int, base: float, nominal_len: int = 0, *, bf16: bool = False):
        super().__init__()
        self.dims = dims
        self.base = base
        self.nominal_len = nominal_len
        self.bf16 = bf16
        self.register_buffer("inv_freq", self._inv_freq(base), persistent=False)
        # Tables for the longest length built so far with one base: a shorter length with the
        # same base (any length at or below nominal) is a prefix of them, so incremental
        # decoding, which asks for one more position each step, does not rebuild them.
        self._cached_key: tuple[float, torch.device, torch.dtype] | None = None
        self._cos: Tensor | None = None
        self._sin: Tensor | None = None

    def _inv_freq(self, base: float, device: torch.device | None = None) -> Tensor:
        exponents = torch.arange(0, self.dims, 2, dtype=torch.float32, device=device) / self.dims
        return 1.0 / (base**exponents)

    def base_at(self, seq_len: int) -> float:
        """The rotary base a forward over `seq_len` positions uses (NTK-rescaled above nominal)."""
        return ntk_base(self.base, seq_len, self.nominal_len, self.dims)

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(cos, sin), each [1, 1, seq_len, dims // 2], in `dtype`."""
        inv_freq = self.inv_freq
        base = self.base_at(seq_len)
        key = (base, inv_freq.device, inv_freq.dtype)
        if self._cached_key != key or self._cos is None or self._cos.size(-2) < seq_len:
            if base != self.base:
                inv_freq = self._inv_freq(base, inv_freq.device)
            elif self.bf16:
                inv_freq = inv_freq.bfloat16()
            positions = torch.arange(seq_len, device=inv_freq.device, dtype=inv_freq.dtype)
            angles = torch.outer(positions, inv_freq)
            self._cos = angles.cos()[None, None]
            self._sin = angles.sin()[None, None]
            self._cached_key = key
        return self._cos[..., :seq_len, :].to(dtype), self._sin[..., :seq_len, :].to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on the first 2·cos.size(-1) dims of x; any dims beyond pass through.

    Inside the rotated span of R dims, dim j is paired with dim j + R/2 (not interleaved pairs).
    The sign (first half gets `+ x2·sin`) is the official script's; the opposite sign would be an
    equally valid RoPE but would not reproduce its checkpoints.
    """
    rotated = 2 * cos.size(-1)
    if rotated < x.size(-1):
        return torch.cat((apply_rotary(x[..., :rotated], cos, sin), x[..., rotated:]), dim=-1)
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
