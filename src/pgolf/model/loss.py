"""Soft-capped cross-entropy in one pass over the raw logits: TOP's training loss (SPEC §5.15).

The plain path stores the capped logits (and the tanh for its backward) as [N, V] tensors and
widens them to fp32 for the loss; at V = 8192 those dominate the activation memory of the head.
Here the forward keeps only the raw logits and one log-sum-exp per row, and the backward
recomputes the cap from them. Both passes work in fp32 whatever the logits' dtype, as TOP's
Triton kernel does; on CUDA under torch.compile each pass becomes one fused kernel, on the CPU it
is plain PyTorch.

TOP's kernel writes the cap as 2C·σ(2z/C) = C·tanh(z/C) + C: a constant shift of every logit,
which leaves the loss unchanged, and only the sigmoid's σ(1 − σ) is needed for the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _capped(z: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """(C·tanh(z/C) + C, σ(2z/C)), both fp32."""
    s = torch.sigmoid(z.float() * (2.0 / cap))
    return (2.0 * cap) * s, s


class _SoftcappedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, targets: Tensor, cap: float) -> Tensor:
        capped, _ = _capped(z, cap)
        lse = torch.logsumexp(capped, dim=-1)
        ctx.save_for_backward(z, targets, lse)
        ctx.cap = cap
        return lse - capped.gather(-1, targets[:, None]).squeeze(-1)

    @staticmethod
    def backward(ctx, grad_losses: Tensor) -> tuple[Tensor, None, None]:
        z, targets, lse = ctx.saved_tensors
        capped, s = _capped(z, ctx.cap)
        # d loss / d capped = softmax − one-hot; d capped / d z = 2C · (2/C) · σ(1 − σ) = 4σ(1 − σ).
        grad = torch.exp(capped - lse[:, None])
        grad.scatter_add_(-1, targets[:, None], torch.full_like(lse[:, None], -1.0))
        grad = grad * (grad_losses.float()[:, None] * 4.0) * (s * (1.0 - s))
        return grad.to(z.dtype), None, None


def softcapped_cross_entropy(z: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Per-row cross-entropy of `cap·tanh(z/cap)` against `targets`, fp32; z is [N, V] raw."""
    if cap <= 0:
        raise ValueError(f"the soft cap must be positive, got {cap}")
    return _SoftcappedCrossEntropy.apply(z, targets.long(), float(cap))
