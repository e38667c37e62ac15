"""Per-row scales from a clip rule (SPEC §5.20, §5.22, §4.8).

Every rule returns float16-rounded scales (as float32, see `grid`), s_r = c_r / qmax, floored at
1/qmax when `floor` is set (the records' rule, `grid.row_scale`):
- `percentile`: c_r = the q-quantile of |w_r| (the baseline's 0.9999984);
- `rowmax`: c_r = max |w_r| (no clipping);
- `search`: S414's GPTQ-lite, five quantiles (0.999, 0.9995, 0.9999, 0.99999, 1.0) and keep the one
  with the lowest round-to-nearest MSE. Per *matrix* by default (one quantile for the whole matrix,
  per-row clip values), as S414's code does; `per_row=True` picks per row, as P578/P1004 do, which
  is never worse in RTN MSE but tunes each row to an objective GPTQ will then change;
- `sdclip`: c_r = k · std(w_r) (S1394): no search, and k trades bytes for error directly because
  the entropy of the integers is ≈ bits − log2 k + const;
- `hsdclip`: SDClip widened for rows the calibration data leans on (HSD):
  c_r = k · σ_r · (1 + λ (ρ_r − 1)), where ρ_r = w_r H w_rᵀ / mean_r(w_r H w_rᵀ) is row r's share of
  the layer's output energy under the calibration Hessian H (1 on average).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pgolf.artifact.int8 import row_quantile
from pgolf.quant.grid import dequantize, quantize_rtn, row_scale, to_fp16_scale

SEARCH_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
CLIP_METHODS = ("percentile", "rowmax", "search", "search-gptq", "sdclip", "hsdclip")


def percentile_scales(w: Tensor, qmax: int, q: float, floor: bool = False) -> Tensor:
    a = w.float().abs()
    clip = a.amax(dim=1) if q >= 1.0 else row_quantile(a, q)
    return to_fp16_scale(row_scale(clip, qmax, floor))


def rtn_mse(w: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """Per-row mean squared error of round-to-nearest with these scales."""
    return (dequantize(quantize_rtn(w, scale, qmax), scale) - w.float()).square().mean(dim=1)


def search_scales(
    w: Tensor,
    qmax: int,
    quantiles: Sequence[float] = SEARCH_QUANTILES,
    per_row: bool = False,
    floor: bool = False,
) -> tuple[Tensor, dict]:
    """GPTQ-lite: the candidate quantile with the lowest RTN MSE (per matrix or per row)."""
    cands = [percentile_scales(w, qmax, q, floor) for q in quantiles]
    errs = torch.stack([rtn_mse(w, s, qmax) for s in cands])  # [candidates, rows]
    if per_row:
        best = errs.argmin(dim=0)
        scale = torch.stack(cands)[best, torch.arange(w.shape[0])]
        return scale, {"clip_quantiles": [quantiles[i] for i in best.tolist()]}
    best = int(errs.mean(dim=1).argmin())
    return cands[best], {"clip_quantile": quantiles[best]}


def sdclip_scales(w: Tensor, qmax: int, sigmas: float, floor: bool = False) -> Tensor:
    # torch.std is the unbiased estimate; at ≥ 512 columns the n/(n-1) factor is < 0.2 %.
    return to_fp16_scale(row_scale(sigmas * w.float().std(dim=1), qmax, floor))


def row_importance(w: Tensor, h: Tensor) -> Tensor:
    """ρ_r = w_r H w_rᵀ / mean over rows (1 on average; all ones if H carries no signal)."""
    w64 = w.double()
    energy = ((w64 @ h.double()) * w64).sum(dim=1).clamp(min=0)
    mean = energy.mean()
    return (energy / mean).float() if mean > 0 else torch.ones(w.shape[0])


def hsdclip_scales(
    w: Tensor, h: Tensor, qmax: int, sigmas: float, lam: float, floor: bool = False
) -> Tensor:
    widen = 1.0 + lam * (row_importance(w, h) - 1.0)
    clip = sigmas * w.float().std(dim=1) * widen.clamp(min=0.05)
    return to_fp16_scale(row_scale(clip, qmax, floor))
