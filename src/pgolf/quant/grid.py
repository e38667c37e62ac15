"""Symmetric per-row integer grids (SPEC §5.19): values in [-qmax, qmax], one per int8 byte.

qmax = 2**(bits-1) - 1 for 5..8 bits (int5 ±15, int6 ±31, int7 ±63, int8 ±127), the rule of the
GPTQ records from S1394 on. (INT5's record used the asymmetric [-16, 15]; a symmetric grid wastes
that one level but keeps quantisation and pruning sign-symmetric.)

Scales are stored float16, so every function here takes the scale *after* its float16 rounding:
the integers are chosen against the very scale the decoder will multiply by, and dequantisation
`q · s` is exact in float32 (|q| ≤ 127 has 7 significant bits, s has 11).
"""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_BITS = (5, 6, 7, 8)
# Smallest positive float16 (a subnormal). A row of zeros still needs a non-zero scale to divide
# by; any positive value works there, the row quantises to all zeros either way.
MIN_SCALE = 2.0**-24


def qmax_for(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; expected one of {SUPPORTED_BITS}")
    return (1 << (bits - 1)) - 1


def min_scale(qmax: int, floor: bool = False) -> float:
    """The smallest row scale: 1/qmax with the records' floor, else MIN_SCALE.

    The 1/qmax floor is what every record from the baseline to S1060 (and the seeds) does, in the
    quantizer and in QAT alike: it binds on every row with c_r < 1, i.e. nearly all trained rows,
    which then use the grid {k/qmax}, much coarser than their range (SPEC §4.8, §5.20). S1394+
    floor at 1e-10 instead, i.e. not at all.
    """
    return 1.0 / qmax if floor else MIN_SCALE


def row_scale(clip: Tensor, qmax: int, floor: bool = False) -> Tensor:
    """s_r = c_r / qmax in float32, never below `min_scale(qmax, floor)`."""
    return (clip.float() / qmax).clamp_min(min_scale(qmax, floor))


def to_fp16_scale(scale: Tensor) -> Tensor:
    """Round positive per-row scales to float16 (floored so none becomes 0), as float32."""
    s = scale.float().clamp(min=MIN_SCALE, max=65504.0)
    return s.half().float().clamp(min=MIN_SCALE)


def quantize_rtn(w: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """Round to nearest on the grid: clamp(round(w / s_row), ±qmax) as int8."""
    q = torch.round(w.float() / scale.float()[:, None]).clamp_(-qmax, qmax)
    return q.to(torch.int8)


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """w_hat = q · s_row in float32 (exact, see the module note)."""
    return q.float() * scale.float()[:, None]
