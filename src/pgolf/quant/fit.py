"""Fit the artifact under a byte target (SPEC §1.2, §5.24) and report where the bytes went.

Order of knobs, cheapest first: (1) the codec — per-section `auto` picks the smallest, lossless;
a configured codec that misses the target is replaced by `auto`, and the result says so under
`codec_switched` (so does a section the configured codec cannot store, e.g. `rans` on float16);
(2) pruning, lossy: zero the quantised entries whose loss costs least, as few as the target
needs. Modes:
- `pm1`: entries equal to ±1, cost s_row² · H_jj when a calibration Hessian exists (P639), else
  s_row² (S1019/PR #609);
- `magnitude`: any non-zero entry, cost (q · s_row)², i.e. magnitude pruning in the quantised
  domain (no re-quantisation per probe);
- `none`: fail if the target is not met.
The count is found by binary search on an entropy estimate of the packed size (histograms only,
so each probe costs milliseconds), then checked by packing for real; if the real artifact is
still over, the search repeats with the overshoot as extra margin.

Budgets are decimal bytes: 16,000,000, never 16 MiB (S1019's TARGET_MB × 1024² bug, SPEC §1.2).
"""

from __future__ import annotations

import numpy as np
import torch

from pgolf.artifact import rans
from pgolf.artifact.container import PackedArtifact, pack_sections
from pgolf.artifact.int8 import SCALE_SUFFIX
from pgolf.artifact.mixed import LQER_MARK
from pgolf.errors import PgolfError
from pgolf.quant.quantize import QuantizedModel
from pgolf.rules import BYTES_CAP

PRUNE_MODES = ("pm1", "magnitude", "none")
_MAX_ROUNDS = 8


def default_target_bytes(code_bytes: int) -> int:
    """Model bytes left under the cap once the code is counted, in decimal bytes."""
    return BYTES_CAP - int(code_bytes)


def _int_tensors(qm: QuantizedModel) -> list[str]:
    return [n for n, e in qm.meta["tensors"].items() if e["scheme"] == "int"]


def prune_candidates(
    qm: QuantizedModel, mode: str, hessians: dict[str, torch.Tensor] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(tensor id, flat index, value) of every candidate entry, cheapest to zero first."""
    names = _int_tensors(qm)
    tids, idxs, vals, costs = [], [], [], []
    for t, name in enumerate(names):
        q = qm.arrays[name]
        s = qm.arrays[name + SCALE_SUFFIX].astype(np.float64)
        flat = q.ravel()
        idx = np.flatnonzero(np.abs(flat) == 1) if mode == "pm1" else np.flatnonzero(flat)
        rows, cols = np.divmod(idx, q.shape[1])
        cost = (s[rows] * flat[idx]) ** 2
        h = (hessians or {}).get(name)
        if mode == "pm1" and h is not None:
            cost = cost * h.diagonal().double().numpy()[cols]
        tids.append(np.full(idx.size, t, np.int32))
        idxs.append(idx.astype(np.int64))
        vals.append(flat[idx].astype(np.int16))
        costs.append(cost)
    if not names:
        empty = np.empty(0, np.int64)
        return empty.astype(np.int32), empty, empty.astype(np.int16), names
    order = np.argsort(np.concatenate(costs), kind="stable")
    return (
        np.concatenate(tids)[order],
        np.concatenate(idxs)[order],
        np.concatenate(vals)[order],
        names,
    )


def _histograms(qm: QuantizedModel, names: list[str]) -> np.ndarray:
    return np.stack(
        [np.bincount(qm.arrays[n].ravel().astype(np.int64) + 128, minlength=256) for n in names]
    )


def _estimate(hist: np.ndarray) -> float:
    return sum(rans.coded_bytes_estimate(h) for h in hist)


def _savings(hist0: np.ndarray, base: float, tids: np.ndarray, vals: np.ndarray, n: int) -> float:
    """Estimated bytes saved by zeroing the first n candidates."""
    if n == 0:
        return 0.0
    moved = np.bincount(
        tids[:n].astype(np.int64) * 256 + vals[:n] + 128, minlength=hist0.size
    ).reshape(hist0.shape)
    hist = hist0 - moved
    hist[:, 128] += moved.sum(axis=1)
    return base - _estimate(hist)


def codec_switch(packed: PackedArtifact, configured: str, why: str | None) -> dict | None:
    """How the artifact departs from the configured codec, and why; None where it does not.

    `why` is the fitter's reason when it replaced the codec; otherwise only sections the codec
    does not apply to (packed by `auto` instead) count as a switch.
    """
    if configured == "auto":
        return None
    other = [s for s in packed.sections if s["codec"] != configured]
    if why is None:
        if not other:
            return None
        dtypes = ", ".join(sorted({s["dtype"] for s in other}))
        why = f"{configured} cannot store {dtypes} sections; auto packed them"
    return {
        "from": configured,
        "to": "auto",
        "why": why,
        "sections": [
            {"dtype": s["dtype"], "codec": s["codec"], "tensors": len(s["names"])} for s in other
        ],
    }


def fit_to_budget(
    qm: QuantizedModel,
    target_bytes: int,
    compressor: str = "auto",
    prune: str = "pm1",
    hessians: dict[str, torch.Tensor] | None = None,
) -> tuple[PackedArtifact, dict]:
    """Pack `qm` (pruning it in place if needed) so the artifact is ≤ target_bytes."""
    if prune not in PRUNE_MODES:
        raise PgolfError(f"quant.fit_prune {prune!r}: expected one of {PRUNE_MODES}")
    if target_bytes <= 0:
        raise PgolfError(f"quant.target_bytes: {target_bytes} leaves no room for the model")
    info: dict = {"target_bytes": int(target_bytes), "compressor": compressor, "pruned": None}
    packed = pack_sections(qm.arrays, qm.meta, codec=compressor)
    info["unpruned_bytes"] = len(packed.data)
    info["codec_switched"] = codec_switch(packed, compressor, None)
    if len(packed.data) <= target_bytes:
        return packed, info
    if compressor != "auto":  # the lossless knob first
        why = (
            f"{compressor} packed {len(packed.data):,} bytes, over the {target_bytes:,}-byte "
            "target; auto (the smallest codec per section, lossless) came before pruning"
        )
        packed = pack_sections(qm.arrays, qm.meta, codec="auto")
        info["compressor"] = "auto"
        info["unpruned_bytes"] = len(packed.data)
        info["codec_switched"] = codec_switch(packed, compressor, why)
        if len(packed.data) <= target_bytes:
            return packed, info
    if prune == "none":
        raise PgolfError(
            f"quant.target_bytes={target_bytes}: the artifact is {len(packed.data):,} bytes "
            "and quant.fit_prune=none allows no pruning"
        )
    # Zeroing a few entries barely changes which back-end wins a section, so later rounds reuse
    # the codecs `auto` just chose instead of trying every back-end again (minutes at 27M params).
    groups = [sec["names"] for sec in packed.sections]
    chosen = [sec["codec"] for sec in packed.sections]
    tids, idxs, vals, names = prune_candidates(qm, prune, hessians)
    hist0 = _histograms(qm, names) if names else np.zeros((0, 256), np.int64)
    base = _estimate(hist0)
    original = {n: qm.arrays[n].copy() for n in names}
    total, margin, size = len(tids), 0, len(packed.data)
    for round_ in range(1, _MAX_ROUNDS + 1):
        need = info["unpruned_bytes"] - (target_bytes - margin)
        lo, hi = 0, total
        while lo < hi:  # smallest n whose estimated saving covers the need
            mid = (lo + hi) // 2
            if _savings(hist0, base, tids, vals, mid) >= need:
                hi = mid
            else:
                lo = mid + 1
        n = lo
        for name in names:
            qm.arrays[name] = original[name].copy()
        for t in np.unique(tids[:n]):
            sel = tids[:n] == t
            qm.arrays[names[t]].reshape(-1)[idxs[:n][sel]] = 0
        packed = pack_sections(
            qm.arrays, qm.meta, groups=groups, section_codecs=chosen, codec=info["compressor"]
        )
        size = len(packed.data)
        if size <= target_bytes:
            per_tensor = np.bincount(tids[:n], minlength=len(names))
            info["pruned"] = {
                "mode": prune,
                "hessian_weighted": prune == "pm1" and bool(hessians),
                "count": int(n),
                "candidates": int(total),
                "rounds": round_,
                "per_tensor": {names[i]: int(c) for i, c in enumerate(per_tensor) if c},
            }
            return packed, info
        if n == total:
            break
        margin += size - target_bytes + 64
    for name in names:
        qm.arrays[name] = original[name]
    raise PgolfError(
        f"quant.target_bytes={target_bytes:,}: cannot fit; after pruning every {prune} "
        f"candidate the artifact is still {size:,} bytes (lower the bit widths or clip sigmas)"
    )


def artifact_report(qm: QuantizedModel, packed: PackedArtifact, fit: dict) -> dict:
    """Where the bytes went (per class, per tensor, vs the entropy bound) and how quantisation
    went (error per class, GPTQ fallbacks, what the fitter pruned)."""
    classes = {n: e.get("qclass", e["scheme"]) for n, e in qm.meta["tensors"].items()}
    per_tensor: dict[str, dict] = {}
    per_class: dict[str, float] = {}
    for sec in packed.sections:
        raw_total = max(sec["raw_nbytes"], 1)
        sizes = {n: qm.arrays[n].nbytes for n in sec["names"]}
        for name in sec["names"]:
            share = sec["nbytes"] * sizes[name] / raw_total
            base = name.removesuffix(SCALE_SUFFIX)
            cls = "lqer" if LQER_MARK in base else classes.get(base, "float")
            kind = "scales" if name.endswith(SCALE_SUFFIX) else "values"
            per_class[cls] = per_class.get(cls, 0.0) + share
            row = per_tensor.setdefault(base, {"class": cls, "codec": sec["codec"]})
            row[f"{kind}_bytes"] = round(share, 1)
            if kind == "values" and qm.meta["tensors"].get(base, {}).get("scheme") == "int":
                row["entropy_bytes"] = round(rans.entropy_bytes(qm.arrays[name]), 1)
    errors: dict[str, dict] = {}
    for name, st in qm.stats.items():
        agg = errors.setdefault(classes[name], {"tensors": 0, "rel_mse": 0.0, "hessian_error": []})
        agg["tensors"] += 1
        agg["rel_mse"] += st["rel_mse"]
        if "hessian_error" in st:
            agg["hessian_error"].append(st["hessian_error"])
    for agg in errors.values():
        agg["rel_mse"] /= agg["tensors"]
        he = agg.pop("hessian_error")
        agg["hessian_error"] = float(np.mean(he)) if he else None
    int_entropy = sum(r.get("entropy_bytes", 0.0) for r in per_tensor.values())
    int_bytes = sum(r.get("values_bytes", 0.0) for r in per_tensor.values() if "entropy_bytes" in r)
    return {
        "bytes_model": len(packed.data),
        **fit,
        "bytes_per_class": {k: round(v) for k, v in sorted(per_class.items())},
        "int_values_bytes": round(int_bytes),
        "int_values_entropy_bytes": round(int_entropy),
        "sections": [
            {k: s[k] for k in ("names", "codec", "nbytes", "raw_nbytes", "candidates")}
            for s in packed.sections
        ],
        "tensors": per_tensor,
        "quant_error": errors,
        "gptq_fallbacks": {n: st["fallback"] for n, st in qm.stats.items() if st.get("fallback")},
        "gptq_damp_retries": {
            n: st["damp_retries"] for n, st in qm.stats.items() if st.get("damp_retries")
        },
        "quant_stats": qm.stats,
        "quantize_time_s": round(qm.seconds, 3),
    }
