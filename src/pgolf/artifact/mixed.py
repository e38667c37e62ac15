"""The mixed codec's format (`pgolf-mixed-v1`, SPEC §5.19) as a reader sees it.

Arrays: an int tensor stores its int8 values under its own name and its float16 row scales under
`name + SCALE_SUFFIX`; float16 and raw tensors store themselves. With `quant.lqer` a corrected
matrix NAME adds its low-rank factors as int8 arrays `NAME::lqer_a` / `NAME::lqer_b`, each with
group scales under `SCALE_SUFFIX`, and its meta entry gains `"lqer": {"rank", "layout"}`. `meta`
records each tensor's scheme, original dtype and shape, so dequantisation restores a state dict
that `load_state_dict(strict=True)` accepts. Meta dtype names are looked up in a fixed table,
never resolved by attribute (the artifact is data, DESIGN).

Only decoding lives here, beside the format: the writer (GPTQ, per-role bits, fitting, the LQER
factors) is pgolf.quant, and loading an artifact must not need it.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from pgolf.artifact.container import array_to_tensor
from pgolf.artifact.int8 import SCALE_SUFFIX, rebuild_state, require_scales
from pgolf.errors import PgolfError

FORMAT = "pgolf-mixed-v1"
LQER_MARK = "::lqer_"
FACTOR_A = LQER_MARK + "a"
FACTOR_B = LQER_MARK + "b"
LQER_LAYOUTS = ("asym", "sym")


def dequantize_groups(q: Tensor, scale: Tensor) -> Tensor:
    """An LQER factor's values: each run of q.numel() / scale.numel() entries times its scale."""
    return (q.reshape(scale.numel(), -1).float() * scale[:, None]).reshape(q.shape)


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
    bad_layout = not isinstance(rank, int) or info.get("layout") not in LQER_LAYOUTS
    if bad_layout or rank < 1 or w.ndim != 2:
        raise PgolfError(f"artifact meta: tensor {name!r} has an invalid LQER entry {info!r}")
    a = _factor(arrays, name + FACTOR_A, (w.shape[0], rank))
    b = _factor(arrays, name + FACTOR_B, (rank, w.shape[1]))
    return w + a @ b


def _decode(name: str, scheme, stored: Tensor, scale: Tensor | None) -> Tensor:
    if scheme in ("raw", "float16"):
        return stored
    if scheme != "int":
        raise PgolfError(f"artifact meta: tensor {name!r} has unknown scheme {scheme!r}")
    scale = require_scales(name, scale)
    if stored.ndim != 2 or scale.shape != (stored.shape[0],):
        raise PgolfError(
            f"artifact: tensor {name!r} has {tuple(scale.shape)} scales for a "
            f"{tuple(stored.shape)} matrix"
        )
    return stored.float() * scale[:, None]


def dequantize_mixed(arrays: dict[str, np.ndarray], meta: dict) -> dict[str, Tensor]:
    """Inverse of `pgolf.quant.quantize.quantize_state`: q · s per row (+ the LQER factors'
    product) in float32, then the original dtype."""

    def decode(name: str, scheme, stored: Tensor, scale: Tensor | None) -> Tensor:
        w = _decode(name, scheme, stored, scale)
        return apply_correction(w, name, meta["tensors"][name], arrays)

    return rebuild_state(arrays, meta, FORMAT, decode)
