"""The official baseline quantisation (SPEC §4.8): int8 per-row quantisation of a state dict.

Per tensor, in this order:
- not floating point: stored unchanged;
- float with at most 65,536 elements: kept as float. Control tensors (names containing one of
  CONTROL_PATTERNS) stay float32 because they steer every layer and cost little; the rest are stored
  float16. The original dtype is recorded so dequantisation restores it;
- 2-D float: per-row clip c_r = quantile(|w_r|, 0.9999984), scale s_r = max(c_r/127, 1/127),
  q = clamp(round(clamp(w, ±c_r) / s_r), ±127) as int8, scales stored float16;
- any other float (1-D above the limit, 3-D and up): the same with one float32 scale for the tensor,
  s = c/127, or 1 when c is 0.

The result is a (name -> numpy array, meta) pair for `pgolf.artifact.container`. Quantised values
are stored under the tensor's own name, row/tensor scales under `name + SCALE_SUFFIX`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pgolf.artifact.container import array_to_tensor, tensor_to_array
from pgolf.errors import PgolfError

FORMAT = "pgolf-int8-per-row-v1"
SCALE_SUFFIX = "::scale"
CLIP_QUANTILE = 0.9999984  # the 99.99984th percentile of |w|, as the baseline uses
KEEP_FLOAT_MAX_NUMEL = 65_536
CONTROL_PATTERNS = (
    "attn_scale",
    "attn_scales",
    "mlp_scale",
    "mlp_scales",
    "resid_mix",
    "resid_mixes",
    "q_gain",
    "skip_weight",
    "skip_weights",
)
# torch.quantile refuses inputs above 2**24 elements.
QUANTILE_MAX_NUMEL = 1 << 24

# Only these dtype names may appear in meta: restoring is a table lookup, never getattr on
# names read from a file.
_TORCH_DTYPES = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
    )
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_control_tensor(name: str) -> bool:
    return any(pattern in name for pattern in CONTROL_PATTERNS)


def _quantile_by_selection(x: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile along the last dim with torch.quantile's linear interpolation, for any size.

    Mirrors torch's arithmetic so results agree bit for bit where both run: the rank q*(n-1) is
    formed in the input dtype, the two neighbours come from order statistics and are lerp'd.
    """
    n = x.shape[-1]
    rank = torch.tensor(q, dtype=x.dtype) * (n - 1)
    below = int(rank.floor())
    above = int(rank.ceil())
    lo = torch.kthvalue(x, below + 1, dim=-1).values
    hi = lo if above == below else torch.kthvalue(x, above + 1, dim=-1).values
    return torch.lerp(lo, hi, rank - below)


def row_quantile(x: torch.Tensor, q: float, max_numel: int = QUANTILE_MAX_NUMEL) -> torch.Tensor:
    """Per-row quantile of a 2-D float tensor; works past torch.quantile's size limit.

    Rows are fed to torch.quantile in chunks that fit its limit; a single row larger than the
    limit falls back to the selection-based equivalent.
    """
    rows, cols = x.shape
    if cols > max_numel:
        return _quantile_by_selection(x, q)
    step = max(1, max_numel // max(cols, 1))
    parts = [torch.quantile(x[i : i + step], q, dim=1) for i in range(0, rows, step)]
    return torch.cat(parts) if parts else x.new_empty((0,))


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    clip = row_quantile(w.abs(), CLIP_QUANTILE)
    clipped = torch.clamp(w, -clip[:, None], clip[:, None])
    # The 1/127 floor is the official rule: any row with c_r < 1 (nearly all of them in practice)
    # gets the same scale. Kept for parity with the baseline's scores and sizes.
    scale = torch.clamp(clip / 127.0, min=1.0 / 127.0)
    q = torch.clamp(torch.round(clipped / scale[:, None]), -127, 127).to(torch.int8)
    # q uses the float32 scale, but only its float16 rounding is stored, as the baseline does.
    return q, scale.to(torch.float16)


def _quantize_whole(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    clip = float(row_quantile(w.abs().reshape(1, -1), CLIP_QUANTILE)[0])
    scale = torch.tensor(clip / 127.0 if clip > 0 else 1.0, dtype=torch.float32)
    q = torch.clamp(torch.round(torch.clamp(w, -clip, clip) / scale), -127, 127).to(torch.int8)
    return q, scale


def quantize_state_dict_int8(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Quantise a state dict by the baseline rules; return (arrays, meta) for the container."""
    arrays: dict = {}
    entries: dict[str, dict] = {}
    for name, tensor in state_dict.items():
        if SCALE_SUFFIX in name:
            raise ValueError(f"state dict key {name!r} contains the reserved {SCALE_SUFFIX!r}")
        t = tensor.detach().to("cpu").contiguous()
        entry = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
        if not t.is_floating_point():
            entry["scheme"] = "raw"
            arrays[name] = tensor_to_array(t)
        elif t.numel() <= KEEP_FLOAT_MAX_NUMEL:
            entry["scheme"] = "float"
            keep = torch.float32 if is_control_tensor(name) else torch.float16
            arrays[name] = tensor_to_array(t.to(keep))
        else:
            w = t.float()
            if w.ndim == 2:
                entry["scheme"] = "int8_per_row"
                q, scale = _quantize_rows(w)
            else:
                entry["scheme"] = "int8_per_tensor"
                q, scale = _quantize_whole(w)
            arrays[name] = tensor_to_array(q)
            arrays[name + SCALE_SUFFIX] = tensor_to_array(scale)
        entries[name] = entry
    return arrays, {"format": FORMAT, "tensors": entries}


def rebuild_state(
    arrays: dict, meta: dict, expected_format: str, decode: Callable
) -> dict[str, torch.Tensor]:
    """The checks every artifact format shares, around a format-specific `decode`.

    `decode(name, scheme, stored, scale)` turns one stored tensor (and its float32 scales, or None)
    into values; this function restores the original dtype and checks the shape the meta records.
    """
    if not isinstance(meta, dict) or meta.get("format") != expected_format:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise PgolfError(f"artifact meta: format {found!r}, expected {expected_format!r}")
    out: dict[str, torch.Tensor] = {}
    for name, entry in meta.get("tensors", {}).items():
        dtype = _TORCH_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
        if dtype is None:
            raise PgolfError(f"artifact meta: tensor {name!r} has an invalid entry {entry!r}")
        if name not in arrays:
            raise PgolfError(f"artifact: tensor {name!r} is listed in meta but missing")
        stored = array_to_tensor(arrays[name])
        scales = arrays.get(name + SCALE_SUFFIX)
        scale = None if scales is None else array_to_tensor(scales).float()
        value = decode(name, entry.get("scheme"), stored, scale).to(dtype)
        if list(value.shape) != entry.get("shape"):
            raise PgolfError(
                f"artifact: tensor {name!r} has shape {list(value.shape)}, "
                f"meta says {entry.get('shape')!r}"
            )
        out[name] = value
    return out


def require_scales(name: str, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        raise PgolfError(f"artifact: quantised tensor {name!r} has no scales")
    return scale


def _decode_int8(name: str, scheme, stored: torch.Tensor, scale) -> torch.Tensor:
    if scheme in ("raw", "float"):
        return stored
    if scheme not in ("int8_per_row", "int8_per_tensor"):
        raise PgolfError(f"artifact meta: tensor {name!r} has unknown scheme {scheme!r}")
    scale = require_scales(name, scale)
    rows = stored.shape[0] if scheme == "int8_per_row" and stored.ndim else 1
    if scale.numel() != rows:
        raise PgolfError(f"artifact: tensor {name!r} has {scale.numel()} scales, expected {rows}")
    if scheme == "int8_per_row":
        scale = scale.reshape(-1, *([1] * (stored.ndim - 1)))
    return stored.float() * scale


def dequantize_state_dict_int8(arrays: dict, meta: dict) -> dict[str, torch.Tensor]:
    """Rebuild float tensors in their original dtypes: q * scale (per row or per tensor)."""
    return rebuild_state(arrays, meta, FORMAT, _decode_int8)
