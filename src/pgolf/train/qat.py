"""Quantisation-aware training with a straight-through estimator (SPEC §5.12), attached outside.

While QAT is on, every block matrix (`CastedLinear` with role "matrix") computes its training
forward with per-row fake-quantised weights, `w + (q(w) − w).detach()`: the loss sees the rounded
weights, the gradient passes to the fp32 weights unchanged (STE).

Why this shape:
- S414/P578's QAT never ran under `torch.compile`: its on/off switch was a Python class attribute,
  constant-folded at the first trace, so flipping it later changed nothing (§5.12). Here the switch
  is a 0-d tensor read inside the graph and flipped in place, so a compiled graph follows it
  without a recompile. When off it multiplies the correction by 0, leaving the weights bit-exact.
- The model code is not touched: `QAT(model)` gives each matrix layer an instance-level `forward`
  (the class's forward is untouched and comes back on `detach`). Parameters, their names and the
  state dict stay exactly as they were, so checkpoints and artifacts never see QAT.
- Clipping matches the quantizer: the row scale is `clip/qmax` with `clip` the row's
  `clip_percentile`-th percentile of |w| (100 = row max, S414; 99.95 = P578's "matched" clip) and
  values rounded into the quantizer's symmetric range ±qmax (int6: ±31). Upstream's STE clamped to
  [−32, 31] while quantizing to ±31; matching the quantizer is the point of QAT, so the range is the
  quantizer's. For the same reason the scale comes from the quantizer's own rule,
  `grid.row_scale`, including its optional 1/qmax floor (upstream's STE floors at 1/qmax).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.layers import CastedLinear
from pgolf.model.roles import role_of
from pgolf.quant.grid import row_scale


def row_clip(w: Tensor, clip_percentile: float) -> Tensor:
    """Per-row clip value: the `clip_percentile`-th percentile of |w| (linear interpolation)."""
    a = w.detach().float().abs()
    if clip_percentile >= 100.0:
        return a.amax(dim=1)
    return torch.quantile(a, clip_percentile / 100.0, dim=1)


def fake_quantize_rows(
    w: Tensor, bits: int, clip_percentile: float = 100.0, scale_floor: bool = False
) -> Tensor:
    """Round each row of a 2-D weight to `bits`-bit symmetric levels and back (fp32, no grad).

    The scale stays float32 (upstream's STE does not round it to float16 either)."""
    qmax = 2 ** (bits - 1) - 1
    w32 = w.detach().float()
    scale = row_scale(row_clip(w32, clip_percentile), qmax, scale_floor)[:, None]
    return torch.clamp(torch.round(w32 / scale), -qmax, qmax) * scale


def _qat_forward(
    module: CastedLinear, flag: Tensor, bits: int, clip_percentile: float, scale_floor: bool
):
    def forward(x: Tensor) -> Tensor:
        w = module.weight
        if module.training:
            q = fake_quantize_rows(w, bits, clip_percentile, scale_floor).to(w.dtype)
            w = w + flag.to(w.dtype) * (q - w).detach()
        return F.linear(x, w.to(x.dtype), module.bias)

    return forward


class QAT:
    """One model's fake-quant switch: attached once, flipped in place, detached at the end."""

    def __init__(
        self,
        model: nn.Module,
        bits: int = 6,
        clip_percentile: float = 100.0,
        scale_floor: bool = False,
    ):
        if not 2 <= bits <= 8:
            raise ValueError(f"QAT bits must be in 2..8, got {bits}")
        self.bits = bits
        self.clip_percentile = clip_percentile
        self.scale_floor = scale_floor
        self.modules = [
            m
            for m in model.modules()
            if isinstance(m, CastedLinear) and m.weight.ndim == 2 and role_of(m.weight) == "matrix"
        ]
        device = next(model.parameters()).device
        self.flag = torch.zeros((), device=device)
        self._active = False  # host-side mirror: reading the flag back would sync the GPU
        for m in self.modules:
            # An instance attribute shadows the class's forward; nn.Module stores plain functions
            # in __dict__, outside parameters and buffers, so the state dict is unchanged.
            m.forward = _qat_forward(m, self.flag, bits, clip_percentile, scale_floor)

    @property
    def active(self) -> bool:
        return self._active

    def set_active(self, on: bool) -> None:
        # In place: compiled graphs hold this very tensor as an input.
        self.flag.fill_(1.0 if on else 0.0)
        self._active = bool(on)

    def detach(self) -> None:
        for m in self.modules:
            if "forward" in m.__dict__:
                del m.forward
        self.modules = []
