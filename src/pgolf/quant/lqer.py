"""LQER (SPEC §5.19, §5.31): a low-rank correction of the quantisation error, stored beside the
integers it corrects.

Once every matrix is quantised, E = W − deq(Q) is the error the artifact would make. The
`lqer_top_k` matrices with the largest ‖E‖_F (TOP's choice: the absolute error, so big and
coarsely gridded matrices win) get the best rank-r approximation of E, from its SVD:
A = U_r Σ_r (rows × r), B = V_rᵀ (r × cols). The decoder rebuilds W ≈ deq(Q) + Â·B̂. Before the
factors are quantised this removes exactly Σ_{i≤r} σ_i² from ‖E‖_F² (Eckart–Young); the factors
cost (rows + cols)·r bytes before compression, ~6 KB per 512 × 2048 matrix at rank 4.

Only matrices above `keep_float_max_numel` elements are candidates: those are the ones the role
rule quantises (TOP corrects its GPTQ matrices); a smaller tensor is an integer only by an
override, such as TOP's int8 attention gate, which it leaves alone.

Factors are quantised on an integer grid [lo, hi] with float16 scales max|x| / ((hi − lo)/2), one
per group of consecutive entries of the flattened factor:
- asymmetric (TOP, `lqer_asymmetric`): Â int2 [−2, 1], one scale for the matrix; B̂ int4 [−8, 7],
  one scale per `lqer_asym_group` entries. The largest positive entry lands on 1.5 and clamps to
  1, as in TOP. If B's size is not a multiple of the group, the symmetric layout is used;
- symmetric: both ±(2^(b−1) − 1) with one scale per row, b = `lqer_factor_bits`.
Integers are chosen against the float16 scale the decoder multiplies by.

In the artifact the factors are ordinary int8 arrays `NAME::lqer_a` / `NAME::lqer_b` with their
scales under `SCALE_SUFFIX`, and NAME's meta entry gains `"lqer": {"rank", "layout"}`; the decoder,
`apply_correction`, is the format's reader, `pgolf.artifact.mixed`. They are
packed into sections like everything else, so the packed size the fitter holds to the target
counts them. The fitter prunes only the main integers; a pruned entry's error is then not covered
by the correction, which was fitted before.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from pgolf.artifact.int8 import SCALE_SUFFIX
from pgolf.artifact.mixed import FACTOR_A, FACTOR_B, dequantize_groups
from pgolf.errors import PgolfError
from pgolf.quant.config import QuantConfig
from pgolf.quant.grid import to_fp16_scale


def check_config(cfg: QuantConfig) -> None:
    if cfg.lqer_rank < 1 or cfg.lqer_top_k < 1:
        raise PgolfError(
            f"quant.lqer_rank ({cfg.lqer_rank}) and quant.lqer_top_k ({cfg.lqer_top_k}) must be ≥ 1"
        )
    if not 2 <= cfg.lqer_factor_bits <= 8:
        raise PgolfError(f"quant.lqer_factor_bits {cfg.lqer_factor_bits}: expected 2..8")
    if cfg.lqer_asym_group < 1:
        raise PgolfError(f"quant.lqer_asym_group {cfg.lqer_asym_group}: expected ≥ 1")


def error_factors(e: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-r approximation of E as (A = U_r Σ_r, B = V_rᵀ), in float32."""
    u, s, vh = torch.linalg.svd(e.float(), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous()


def quantize_groups(x: Tensor, group: int, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """(int8 values of x's shape, float16-exact scales, one per `group` flattened entries)."""
    g = x.float().reshape(-1, group)
    scale = to_fp16_scale(g.abs().amax(dim=1) / ((hi - lo) / 2))
    q = torch.round(g / scale[:, None]).clamp_(lo, hi).to(torch.int8)
    return q.reshape(x.shape), scale


def factor_grids(cfg: QuantConfig, rows: int, cols: int, rank: int) -> tuple[str, tuple, tuple]:
    """(layout, (group, lo, hi) of A, (group, lo, hi) of B) for a rows × cols matrix."""
    if cfg.lqer_asymmetric and (rank * cols) % cfg.lqer_asym_group == 0:
        return "asym", (rows * rank, -2, 1), (cfg.lqer_asym_group, -8, 7)
    qmax = (1 << (cfg.lqer_factor_bits - 1)) - 1
    return "sym", (rank, -qmax, qmax), (cols, -qmax, qmax)


def top_k_by_error(errors: dict[str, float], k: int) -> list[str]:
    """The k names with the largest error norm; ties keep the state-dict order, as TOP's sort."""
    return [name for name, _ in sorted(errors.items(), key=lambda kv: -kv[1])[:k]]


def _grid_error(w: Tensor, arrays: dict[str, np.ndarray], name: str) -> Tensor:
    q = torch.from_numpy(arrays[name]).float()
    s = torch.from_numpy(arrays[name + SCALE_SUFFIX]).float()
    return w.detach().to("cpu").float() - q * s[:, None]


def add_corrections(
    state: dict[str, Tensor],
    arrays: dict[str, np.ndarray],
    entries: dict[str, dict],
    cfg: QuantConfig,
) -> dict[str, dict]:
    """Correct the top-k int matrices in place (arrays, meta entries); stats per corrected one."""
    check_config(cfg)
    candidates = [
        n
        for n, e in entries.items()
        if e["scheme"] == "int" and math.prod(e["shape"]) > cfg.keep_float_max_numel
    ]
    # Norms first, factors for the chosen few only: one error matrix alive at a time.
    norms = {n: float(_grid_error(state[n], arrays, n).norm()) for n in candidates}
    stats: dict[str, dict] = {}
    for name in top_k_by_error(norms, cfg.lqer_top_k):
        e = _grid_error(state[name], arrays, name)
        a, b = error_factors(e, cfg.lqer_rank)
        rank = a.shape[1]
        layout, grid_a, grid_b = factor_grids(cfg, e.shape[0], e.shape[1], rank)
        qa, sa = quantize_groups(a, *grid_a)
        qb, sb = quantize_groups(b, *grid_b)
        arrays[name + FACTOR_A] = qa.numpy()
        arrays[name + FACTOR_A + SCALE_SUFFIX] = sa.to(torch.float16).numpy()
        arrays[name + FACTOR_B] = qb.numpy()
        arrays[name + FACTOR_B + SCALE_SUFFIX] = sb.to(torch.float16).numpy()
        entries[name]["lqer"] = {"rank": rank, "layout": layout}
        left = e - dequantize_groups(qa, sa) @ dequantize_groups(qb, sb)
        stats[name] = {
            "rank": rank,
            "layout": layout,
            "error_norm": norms[name],
            "error_norm_exact_factors": float((e - a @ b).norm()),
            "error_norm_corrected": float(left.norm()),
        }
    return stats
