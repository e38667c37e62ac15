"""TOP's optimizers (SPEC §5.17, §5.31) against pgolf's, on the 8 × 128 model of `top_config`.

The record's own `Optimizers` class builds its three optimizers over its banked model (its CUDA
side stream stubbed: one process, nothing to overlap); pgolf's `build_optimizers` routes by role.
- every parameter reaches the same optimizer with the same LR, decay and betas;
- five steps from the same weights and gradients (momentum warm-up, LR scales, the 0.3 clip,
  MuonEq-R, Polar-Express Newton–Schulz, decoupled decays) give the same weights, the record's
  bf16 Muon arithmetic made fp32 as pgolf runs on a CPU.
"""

from __future__ import annotations

import pytest
import torch

from pgolf.model.gpt import GPT
from pgolf.model.roles import params_by_role
from pgolf.train.optim import (
    build_optimizers,
    clip_grads,
    muon_momentum_at,
    set_lr_scale,
    set_muon_momentum,
)

from .models import top_config, top_module, top_state_dict, top_train_config
from .official import assert_close
from .test_optimizer import GRAD_STDS, LR_SCALES, ROLE_TO_OFFICIAL, STEPS, _settings
from .training import bf16_as_fp32


@pytest.fixture
def top(monkeypatch):
    """(module, record model with random weights, its optimizers by name, pgolf's twin model)."""
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: None)
    mod = top_module()
    ref = mod.GPT(mod.args)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    built = mod.Optimizers(mod.args, ref)
    optimizers = {n: getattr(built, f"optimizer_{n}") for n in ("tok", "muon", "scalar")}
    ours = GPT(top_config())
    ours.load_state_dict(top_state_dict(mod, ref))
    return mod, ref, optimizers, ours


def _as_module(tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A stand-in whose state_dict() is `tensors`, for `top_state_dict`'s unbanking and renames."""

    class Holder(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            return tensors

    return Holder()


def test_every_parameter_goes_to_the_records_optimizer_with_its_lr_decay_and_betas(top):
    mod, ref, optimizers, ours = top
    names = {id(p): n for n, p in ref.named_parameters()}
    theirs = {}
    for opt_name, opt in optimizers.items():
        for group in opt.param_groups:
            settings = _settings(opt_name, opt, group)
            held = {names[id(p)]: p for p in group["params"]}
            theirs |= dict.fromkeys(top_state_dict(mod, _as_module(held)), settings)
    built = build_optimizers(ours, top_train_config(), tie_embeddings=True)
    where = {id(p): (opt, g) for opt in built for g in opt.param_groups for p in g["params"]}
    routed = {
        name: _settings(ROLE_TO_OFFICIAL[role], *where[id(p)])
        for role, named in params_by_role(ours).items()
        for name, p in named
    }
    assert set(routed) == set(theirs), sorted(set(routed) ^ set(theirs))
    wrong = {n: (routed[n], theirs[n]) for n in routed if routed[n] != theirs[n]}
    assert not wrong, f"routing differs (pgolf, record): {wrong}"
    assert theirs["parallel_resid_lambdas"]["optimizer"] == "scalar"  # not vacuous


def _momentum(args, step: int) -> float:
    frac = min(step / args.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * args.muon_momentum_warmup_start + frac * args.muon_momentum


def test_five_steps_from_the_same_weights_and_gradients_give_the_same_weights(top):
    mod, ref, optimizers, ours = top
    cfg = top_train_config()
    ours_opt = build_optimizers(ours, cfg, tie_embeddings=True)
    ref_params = dict(ref.named_parameters())
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad(), bf16_as_fp32(mod):
        for step, scale, std in zip(STEPS, LR_SCALES, GRAD_STDS, strict=True):
            banked = {n: torch.randn(p.shape, generator=gen) * std for n, p in ref_params.items()}
            grads = top_state_dict(mod, _as_module(banked))
            # The record's step_fn: momentum while warming up, LR scale, clip, then each optimizer.
            for name, p in ref_params.items():
                p.grad = banked[name].clone()
            for group in optimizers["muon"].param_groups:
                group["momentum"] = _momentum(mod.args, step)
            for opt in optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * scale
            torch.nn.utils.clip_grad_norm_(ref.parameters(), mod.args.grad_clip_norm)
            for opt in optimizers.values():
                opt.step()
            for name, p in ours.named_parameters():
                p.grad = grads[name].reshape(p.shape).clone()
            set_muon_momentum(ours_opt, muon_momentum_at(step, cfg))
            set_lr_scale(ours_opt, scale)
            clip_grads(ours.parameters(), cfg.grad_clip_norm)
            for opt in ours_opt:
                opt.step()
    theirs = top_state_dict(mod, ref)
    for name, value in ours.state_dict().items():
        assert_close(f"TOP {name} after {len(STEPS)} steps", value, theirs[name], atol=1e-6)
