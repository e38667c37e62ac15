"""Quantise a whole model by plan (policy) into container arrays (SPEC §5.19).

The arrays and meta are the mixed format, `pgolf.artifact.mixed`, which also reads them back;
with `quant.lqer` the corrected matrices add their low-rank factors (`pgolf.quant.lqer`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor, nn

from pgolf.artifact.container import tensor_to_array
from pgolf.artifact.int8 import SCALE_SUFFIX
from pgolf.artifact.mixed import FORMAT
from pgolf.errors import PgolfError
from pgolf.model.roles import role_of
from pgolf.progress import progress_bar
from pgolf.quant import lqer
from pgolf.quant.config import QuantConfig
from pgolf.quant.gptq import quantize_matrix
from pgolf.quant.hessian import HessianCollector
from pgolf.quant.policy import TensorPlan, gptq_options, plan_tensors


@dataclass
class QuantizedModel:
    arrays: dict[str, np.ndarray]
    meta: dict
    plans: dict[str, TensorPlan]
    stats: dict[str, dict] = field(default_factory=dict)  # per int tensor: quantize_matrix stats
    seconds: float = 0.0


def parameter_roles(model: nn.Module) -> dict[str, str]:
    return {name: role_of(p) for name, p in model.named_parameters()}


def magnitude_prune(w: Tensor, pct: float) -> Tensor:
    """Zero entries below the pct-th percentile of |w| (INT5 / P1004, SPEC §5.24)."""
    if pct <= 0:
        return w
    a = w.abs().flatten()
    k = max(1, int(round(a.numel() * pct / 100.0)))
    threshold = torch.kthvalue(a, k).values
    return torch.where(w.abs() < threshold, torch.zeros_like(w), w)


def quantize_state(
    state: dict[str, Tensor],
    roles: dict[str, str],
    cfg: QuantConfig,
    hessians: dict[str, Tensor] | None = None,
    gptq_capable: set[str] | None = None,
    progress: bool = False,
) -> QuantizedModel:
    """Quantise every tensor by its plan. GPTQ tensors without a Hessian are rounded to nearest
    and say so in their stats (`fallback`), as are GPTQ's own failures.

    `gptq_capable` (default: all) names the tensors that can have a Hessian at all, i.e. that are
    applied as a linear map; others (bigram/VE tables) are simply rounded, which is no fallback.
    """
    plans = plan_tensors(state, roles, cfg)
    if gptq_capable is not None:
        plans = {
            n: replace(p, gptq=False) if p.gptq and n not in gptq_capable else p
            for n, p in plans.items()
        }
    options = gptq_options(cfg)
    hessians = hessians or {}
    arrays: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    stats: dict[str, dict] = {}
    # GPTQ on an 11-layer model takes minutes on CPU: count the quantized matrices as they finish.
    bar = progress_bar(
        total=sum(p.scheme == "int" for p in plans.values()),
        desc="quantize (GPTQ)" if any(p.gptq for p in plans.values()) else "quantize",
        enabled=progress,
        unit=" tensor",
    )
    for name, t in state.items():
        if "::" in name:  # the separator of scale and LQER factor arrays
            raise PgolfError(f"state dict key {name!r} contains the reserved '::'")
        plan = plans[name]
        t = t.detach().to("cpu")
        entry = {"scheme": plan.scheme, "dtype": str(t.dtype).removeprefix("torch.")}
        entry["shape"] = list(t.shape)
        if plan.scheme == "raw":
            arrays[name] = tensor_to_array(t.contiguous())
        elif plan.scheme == "float16":
            arrays[name] = tensor_to_array(t.to(torch.float16).contiguous())
        else:
            w = magnitude_prune(t.float(), cfg.prune_pct)
            h = hessians.get(name)
            if plan.clip.method == "hsdclip" and h is None:
                raise PgolfError(f"quant.matrix_clip=hsdclip: no calibration Hessian for {name}")
            opts = options if plan.gptq else None
            q, scale, st = quantize_matrix(w, h, plan.bits, plan.clip, opts)
            if plan.gptq and h is None:
                st["fallback"] = "no calibration Hessian (layer never reached); rounded to nearest"
            arrays[name] = q.numpy()
            arrays[name + SCALE_SUFFIX] = scale.to(torch.float16).numpy()
            entry.update(bits=plan.bits, qclass=plan.qclass)
            stats[name] = st
            bar.update(1)
        entries[name] = entry
    bar.close()
    if cfg.lqer:
        for name, st in lqer.add_corrections(state, arrays, entries, cfg).items():
            stats[name]["lqer"] = st
    return QuantizedModel(arrays, {"format": FORMAT, "tensors": entries}, plans, stats)


def quantize_model(
    model: nn.Module,
    cfg: QuantConfig,
    hessians: dict[str, Tensor] | None = None,
    progress: bool = False,
) -> QuantizedModel:
    t0 = time.perf_counter()
    state = dict(model.state_dict())
    capable = set(HessianCollector(model).names)
    qm = quantize_state(state, parameter_roles(model), cfg, hessians, capable, progress=progress)
    qm.seconds = time.perf_counter() - t0
    return qm
