"""Muon: momentum SGD whose update is orthogonalised by Newton–Schulz (SPEC §4.4, §5.17).

Each 2-D weight's Nesterov-momentum update U is replaced by an approximation of the nearest
semi-orthogonal matrix (U's polar factor), so every direction in the update moves at about the
same rate. Under torch.distributed, parameter j is orthogonalised on rank j mod world_size and the
results are shared through one all-reduce, exactly as the official `train_gpt.py` does.

Variants used by the records (all off by default):
- decoupled weight decay, W ← W·(1 − lr·wd) before the update (S287+);
- MuonEq-R, each row of U divided by its L2 norm before orthogonalising (S1394);
- the Polar-Express schedule, a different (a, b, c) for each of the five iterations (TOP).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

Coeffs = tuple[float, float, float]

NS5_COEFFS: Coeffs = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel et al. 2025), five iterations, as TOP uses them (SPEC §5.17). Each step is
# the optimal odd quintic for the singular-value interval the previous step leaves, so five steps
# land much closer to 1 than five repeats of one fixed quintic.
POLAR_EXPRESS_COEFFS: tuple[Coeffs, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def coefficients_for_step(schedule: Sequence[Coeffs], i: int) -> Coeffs:
    """Iteration i uses entry i; past the end of the schedule the last entry repeats."""
    return schedule[min(i, len(schedule) - 1)]


def orthogonalize(
    G: torch.Tensor,
    steps: int,
    schedule: Sequence[Coeffs] = (NS5_COEFFS,),
    eps: float = 1e-7,
) -> torch.Tensor:
    """Approximate the polar factor of G (or of each matrix in a stack) with quintic iterations."""
    # bf16 is what the official run uses on GPU; on CPU bf16 matmuls are emulated (~70x slower),
    # so there it runs in fp32 unless G already comes in bf16 (Muon's `bf16_state`).
    dtype = torch.bfloat16 if G.is_cuda or G.dtype == torch.bfloat16 else torch.float32
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    # Iterate on the wide orientation so X Xᵀ is the smaller of the two Gram matrices.
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    for i in range(steps):
        a, b, c = coefficients_for_step(schedule, i)
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if transposed else X


def zeropower_newton_schulz5(
    G: torch.Tensor,
    steps: int,
    coeffs: Coeffs = NS5_COEFFS,
    eps: float = 1e-7,
) -> torch.Tensor:
    """The baseline's fixed quintic, repeated `steps` times.

    The coefficients trade exactness for speed: five steps map every singular value above ~1e-3 of
    ‖G‖_F into about [0.68, 1.21] (measured on the scalar map) instead of converging to 1, which the
    Muon authors found trains just as well. Smaller ones stay small: a rank-deficient G stays so.
    """
    return orthogonalize(G, steps, (coeffs,), eps)


def zeropower_polar_express(G: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """TOP's schedule on G/(‖G‖_F + eps), normalised as TOP does: without the 1.02 margin some
    ports add against bf16 rounding a singular value past 1; one at 1.01 still ends near 0.93."""
    return orthogonalize(G, steps, POLAR_EXPRESS_COEFFS, eps)


def normalize_rows(U: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """MuonEq-R: every row of U to unit L2 norm, so no output unit dominates ‖U‖_F before NS."""
    return U / U.float().norm(dim=-1, keepdim=True).clamp_min(eps).to(U.dtype)


def _aspect_scale(p: torch.Tensor) -> float:
    # A tall orthogonal matrix has rows of RMS norm sqrt(cols/rows) < 1; the factor brings them
    # to 1, so each output unit moves as far as in a wide matrix.
    return max(1.0, p.size(-2) / p.size(-1)) ** 0.5


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters; gradients must already be averaged across ranks (DDP does it)."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float,
        backend_steps: int,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        row_normalize: bool = False,
        polar_express: bool = False,
        bf16_state: bool = False,
    ):
        self.bf16_state = bf16_state
        defaults = dict(
            lr=lr,
            momentum=momentum,
            backend_steps=backend_steps,
            nesterov=nesterov,
            weight_decay=weight_decay,
            row_normalize=row_normalize,
            polar_express=polar_express,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon needs matrices; got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0

        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            momentum = group["momentum"]
            device = params[0].device
            # Every rank contributes its own slices and zeros elsewhere, so a SUM reassembles the
            # full update; bf16 on GPU halves the all-reduce traffic, as in the official script.
            bf16 = device.type == "cuda" or self.bf16_state
            flat_dtype = torch.bfloat16 if bf16 else torch.float32
            updates = torch.zeros(sum(p.numel() for p in params), device=device, dtype=flat_dtype)
            offset = 0
            for j, p in enumerate(params):
                if j % world_size == rank and p.grad is not None:
                    # bf16 state: the banked scripts' gradient copy and momentum (SPEC §5.18).
                    g = p.grad.bfloat16() if self.bf16_state else p.grad
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).add_(g)
                    u = g.add(buf, alpha=momentum) if group["nesterov"] else buf
                    if group.get("row_normalize", False):
                        u = normalize_rows(u)
                    if group.get("polar_express", False):
                        o = zeropower_polar_express(u, steps=group["backend_steps"])
                    else:
                        o = zeropower_newton_schulz5(u, steps=group["backend_steps"])
                    if not self.bf16_state:  # banked scripts scale at apply time, below
                        o = o * _aspect_scale(p)
                    updates[offset : offset + p.numel()] = o.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            wd = group.get("weight_decay", 0.0)
            offset = 0
            for p in params:
                if wd > 0:
                    # Decoupled: the shrink uses the scheduled lr, so it fades with the warm-down.
                    p.mul_(1.0 - group["lr"] * wd)
                update = updates[offset : offset + p.numel()].view_as(p).to(p.dtype)
                scale = _aspect_scale(p) if self.bf16_state else 1.0
                p.add_(update, alpha=-group["lr"] * scale)
                offset += p.numel()
        return loss
