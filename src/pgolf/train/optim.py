"""The optimisers, routed by parameter role (SPEC §4.4, §5.17), and their per-step knobs.

Matrices inside the blocks go to Muon; the embedding, an untied head and the small control tensors
each get their own Adam with its own learning rate. Every param group remembers its `base_lr` so the
schedule (SPEC §4.5) can rescale all of them with one number. With a weight decay set, the embedding
and scalar groups use AdamW (decoupled decay, as S414/S1394); at 0 they stay plain Adam, the
baseline.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pgolf.config import TrainConfig
from pgolf.model.precision import precision_on
from pgolf.model.roles import params_by_role
from pgolf.train.muon import Muon


def _adam(
    params: list[nn.Parameter], lr: float, cfg: TrainConfig, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    # The fused kernel exists only for accelerator tensors; on CPU it would raise.
    fused = all(p.is_cuda for p in params)
    # Adam's own weight_decay is an L2 term in the gradient; the records decay decoupled (AdamW).
    kind = torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
    return kind(
        [{"params": params, "lr": lr, "base_lr": lr}],
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.adam_eps,
        weight_decay=weight_decay,
        fused=fused,
    )


def build_optimizers(
    model: nn.Module, cfg: TrainConfig, tie_embeddings: bool
) -> list[torch.optim.Optimizer]:
    """One optimizer per non-empty role, in the order embedding, head, matrix, scalar."""
    groups = {role: [p for _, p in named] for role, named in params_by_role(model).items()}
    optimizers: list[torch.optim.Optimizer] = []
    if groups["embedding"]:
        lr = cfg.tied_embed_lr if tie_embeddings else cfg.embed_lr
        optimizers.append(_adam(groups["embedding"], lr, cfg, cfg.embed_wd))
    if groups["head"]:
        optimizers.append(_adam(groups["head"], cfg.head_lr, cfg))
    if groups["matrix"]:
        muon = Muon(
            groups["matrix"],
            lr=cfg.matrix_lr,
            momentum=cfg.muon_momentum,
            backend_steps=cfg.muon_backend_steps,
            weight_decay=cfg.muon_wd,
            row_normalize=cfg.muon_row_normalize,
            polar_express=cfg.muon_polar_express,
            bf16_state=precision_on(cfg.muon_bf16_state, "train.muon_bf16_state"),
        )
        for group in muon.param_groups:
            group["base_lr"] = cfg.matrix_lr
        optimizers.append(muon)
    if groups["scalar"]:
        optimizers.append(_adam(groups["scalar"], cfg.scalar_lr, cfg, cfg.adam_wd))
    return optimizers


def set_lr_scale(optimizers: Iterable[torch.optim.Optimizer], scale: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale


def muon_momentum_at(step: int, cfg: TrainConfig) -> float:
    """Muon's momentum at `step`: linear from the warm-up start to its final value, then flat."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def set_muon_momentum(optimizers: Iterable[torch.optim.Optimizer], momentum: float) -> None:
    for opt in optimizers:
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["momentum"] = momentum


def clip_grads(
    params: Iterable[nn.Parameter], max_norm: float, measure: bool = False
) -> float | None:
    """Global-norm clipping over all parameters (max_norm <= 0: off, the baseline).

    Returns the pre-clip global norm when `measure` is set, else None: reading it back syncs the
    device, so the trainer asks only on its logging steps.
    """
    params = [p for p in params if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    elif measure:
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in params])
        )
    else:
        return None
    return float(norm) if measure else None
