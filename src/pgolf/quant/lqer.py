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
scales under `SCALE_SUFFIX`, and NAME's meta entry gains `"lqer": {"rank", "layout"}`. They are
packed into sections like everything else, so the packed size the fitter holds to the target
counts them. The fitter prunes only the main integers; a pruned entry's error is then not covered
by the correction, which was fitted before.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from pgolf.artifact.config import ExportConfig
from pgolf.artifact.container import array_to_tensor
from pgolf.artifact.int8 import SCALE_SUFFIX
from pgolf.errors import PgolfError
from pgolf.quant.grid import to_fp16_scale

LQER_MARK = "::lqer_"
FACTOR_A = LQER_MARK + "a"
FACTOR_B = LQER_MARK + "b"
LAYOUTS = ("asym", "sym")


def check_config(cfg: ExportConfig) -> None:
    if cfg.lqer_rank < 1 or cfg.lqer_top_k < 1:
        raise PgolfError(
            f"export.lqer_rank ({cfg.lqer_rank}) and export.lqer_top_k ({cfg.lqer_top_k}) "
            "must be ≥ 1"
        )
    if not 2 <= cfg.lqer_factor_bits <= 8:
        raise PgolfError(f"export.lqer_factor_bits {cfg.lqer_factor_bits}: expected 2..8")
    if cfg.lqer_asym_group < 1:
        raise PgolfError(f"export.lqer_asym_group {cfg.lqer_asym_group}: expected ≥ 1")


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


def dequantize_groups(q: Tensor, scale: Tensor) -> Tensor:
    return (q.reshape(scale.numel(), -1).float() * scale[:, None]).reshape(q.shape)


def factor_grids(cfg: ExportConfig, rows: int, cols: int, rank: int) -> tuple[str, tuple, tuple]:
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
    cfg: ExportConfig,
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


def _factor(arrays: dict[str, np.ndarray], key: str, shape: tuple[int, int]) -> Tensor:
    if key not in arrays or key + SCALE_SUFFIX not in arrays:
        raise PgolfError(f"artifact: LQER factor {key!r} or its scales are missing")
    q = array_to_tensor(arrays[key])
    scale = array_to_tensor(arrays[key + SCALE_SUFFIX]).float().reshape(-1)
    if tuple(q.shape) != shape or scale.numel() == 0 or q.numel() % scale.numel():
        raise PgolfError(
            f"artifact: LQER factor {key!r} is {tuple(q.shape)} with {scale.numel()} scales; "
            f"expected {shape} with a whole number of entries per scale"
        )
    return dequantize_groups(q, scale)


def apply_correction(w: Tensor, name: str, entry: dict, arrays: dict[str, np.ndarray]) -> Tensor:
    """deq(Q) + Â·B̂ where NAME's meta entry has an LQER correction, else `w` unchanged."""
    info = entry.get("lqer")
    if info is None:
        return w
    rank = info.get("rank") if isinstance(info, dict) else None
    if not isinstance(rank, int) or rank < 1 or info.get("layout") not in LAYOUTS or w.ndim != 2:
        raise PgolfError(f"artifact meta: tensor {name!r} has an invalid LQER entry {info!r}")
    a = _factor(arrays, name + FACTOR_A, (w.shape[0], rank))
    b = _factor(arrays, name + FACTOR_B, (rank, w.shape[1]))
    return w + a @ b
