"""Muon: momentum SGD whose update is orthogonalised by a Newton–Schulz iteration (SPEC §4.4).

Each 2-D weight's Nesterov-momentum update U is replaced by an approximation of the nearest
semi-orthogonal matrix (U's polar factor), so every direction in the update moves at about the
same rate. Under torch.distributed, parameter j is orthogonalised on rank j mod world_size and the
results are shared through one all-reduce, exactly as the official `train_gpt.py` does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

NS5_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_newton_schulz5(
    G: torch.Tensor,
    steps: int,
    coeffs: tuple[float, float, float] = NS5_COEFFS,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Approximate the polar factor of G (or of each matrix in a stack) with a quintic iteration.

    The coefficients trade exactness for speed: five steps map every singular value above ~1e-3 of
    ‖G‖_F into about [0.68, 1.21] (measured on the scalar map) instead of converging to 1, which the
    Muon authors found trains just as well. Smaller ones stay small: a rank-deficient G stays so.
    """
    a, b, c = coeffs
    # bf16 is what the official run uses on GPU; on CPU bf16 matmuls are emulated (~70x slower).
    dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    # Iterate on the wide orientation so X Xᵀ is the smaller of the two Gram matrices.
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if transposed else X


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters; gradients must already be averaged across ranks (DDP does it)."""

    def __init__(
        self, params, lr: float, momentum: float, backend_steps: int, nesterov: bool = True
    ):
        defaults = dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov)
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
            flat_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            updates = torch.zeros(sum(p.numel() for p in params), device=device, dtype=flat_dtype)
            offset = 0
            for j, p in enumerate(params):
                if j % world_size == rank and p.grad is not None:
                    g = p.grad
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).add_(g)
                    u = g.add(buf, alpha=momentum) if group["nesterov"] else buf
                    o = zeropower_newton_schulz5(u, steps=group["backend_steps"])
                    # A tall orthogonal matrix has rows of RMS norm sqrt(cols/rows) < 1; the factor
                    # brings them to 1, so each output unit moves as far as in a wide matrix.
                    o = o * max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                    updates[offset : offset + p.numel()] = o.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                update = updates[offset : offset + p.numel()].view_as(p).to(p.dtype)
                p.add_(update, alpha=-group["lr"])
                offset += p.numel()
        return loss
