"""Each preset optimizes exactly as its script: the same parameter routing and settings, and the
same weights after a few steps from the same weights and gradients (SPEC §4.4, §5.17, §5.18).

The official side is the script's own `main()` construction (see `training.py`), its Muon run in
one process (banked Parallel Muon included) with its bf16 casts made fp32, as pgolf runs on a CPU.
"""

from __future__ import annotations

import pytest
import torch

from pgolf.model.roles import params_by_role
from pgolf.train.muon import Muon
from pgolf.train.optim import (
    build_optimizers,
    clip_grads,
    muon_momentum_at,
    set_lr_scale,
    set_muon_momentum,
)
from tests.parity.official import PRESET_SCRIPT, assert_close
from tests.parity.training import (
    bf16_as_fp32,
    load_script,
    official_model,
    official_optimizers,
    pgolf_config,
    pgolf_model_like,
    rebank,
    unbank,
)

PRESETS = list(PRESET_SCRIPT)
ROLE_TO_OFFICIAL = {"embedding": "tok", "head": "head", "matrix": "muon", "scalar": "scalar"}

# Five steps taken at these step numbers (momentum warm-up from its start to past its end), each
# at its LR scale, with gradients of this size: the large ones exceed a 0.3 clip, the small not.
STEPS = (0, 1, 700, 1499, 3000)
LR_SCALES = (1.0, 1.0, 0.6, 0.25, 0.05)
GRAD_STDS = (1e-2, 1e-4, 1e-2, 1e-3, 1e-2)


def _settings(opt_name: str, opt: torch.optim.Optimizer, group: dict) -> dict:
    """What an optimizer does to one parameter, in words both sides share."""
    wd = float(group.get("weight_decay", 0.0))
    if opt_name == "muon":
        return dict(
            optimizer="muon",
            lr=group["base_lr"],
            weight_decay=wd,
            nesterov=group["nesterov"],
            backend_steps=group["backend_steps"],
            row_normalize=bool(group.get("row_normalize", False)),
        )
    # Adam's weight_decay is an L2 term in the gradient; AdamW's is decoupled. At 0 they agree.
    kind = "none" if wd == 0 else type(opt).__name__
    return dict(
        optimizer=opt_name,
        lr=group["base_lr"],
        weight_decay=wd,
        decay_kind=kind,
        betas=tuple(group["betas"]),
        eps=group["eps"],
    )


def _official_routing(mod, ref) -> dict[str, dict]:
    names = {id(p): n for n, p in ref.named_parameters()}
    routing = {}
    for opt_name, opt in official_optimizers(mod, ref).items():
        for group in opt.param_groups:
            for p in group["params"]:
                for name in unbank(mod, {names[id(p)]: p}):
                    routing[name] = _settings(opt_name, opt, group)
    return routing


def _pgolf_routing(model, cfg) -> dict[str, dict]:
    optimizers = build_optimizers(model, cfg.train, cfg.model.tie_embeddings)
    by_param = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                by_param[id(p)] = (opt, group)
    routing = {}
    for role, named in params_by_role(model).items():
        for name, p in named:
            opt, group = by_param[id(p)]
            routing[name] = _settings(ROLE_TO_OFFICIAL[role], opt, group)
    return routing


@pytest.fixture(scope="module", params=PRESETS)
def setup(request):
    preset = request.param
    return preset, load_script(PRESET_SCRIPT[preset]), pgolf_config(preset)


def test_every_parameter_goes_to_the_scripts_optimizer_with_its_lr_decay_and_betas(setup):
    preset, mod, cfg = setup
    ref = official_model(mod)
    theirs = _official_routing(mod, ref)
    ours = _pgolf_routing(pgolf_model_like(cfg, mod, ref), cfg)
    assert set(ours) == set(theirs), (
        f"{preset}: parameters only in pgolf {sorted(set(ours) - set(theirs))}, "
        f"only in the script {sorted(set(theirs) - set(ours))}"
    )
    wrong = {n: (ours[n], theirs[n]) for n in ours if ours[n] != theirs[n]}
    assert not wrong, f"{preset}: routing differs (pgolf, official): {wrong}"


def test_momentum_warmup_ns_steps_and_clipping_are_the_scripts(setup):
    preset, mod, cfg = setup
    a, t = mod.args, cfg.train
    knobs = (
        "muon_momentum",
        "muon_momentum_warmup_start",
        "muon_momentum_warmup_steps",
        "muon_backend_steps",
        "grad_clip_norm",
    )
    for knob in knobs:
        assert_close(f"{preset} train.{knob}", getattr(t, knob), getattr(a, knob))


def _official_momentum(args, step: int) -> float:
    """main()'s inline warm-up, the same expression in every script."""
    steps = args.muon_momentum_warmup_steps
    frac = min(step / steps, 1.0) if steps > 0 else 1.0
    return (1 - frac) * args.muon_momentum_warmup_start + frac * args.muon_momentum


def _official_step(mod, ref, optimizers, grads, step, scale):
    for name, p in ref.named_parameters():
        p.grad = grads[name].clone()
    for group in optimizers["muon"].param_groups:
        group["momentum"] = _official_momentum(mod.args, step)
    for opt in optimizers.values():
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
    if mod.args.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(ref.parameters(), mod.args.grad_clip_norm)
    if hasattr(optimizers["muon"], "launch_reduce_scatters"):
        optimizers["muon"].launch_reduce_scatters()  # banked: a no-op in one process
    for opt in optimizers.values():
        opt.step()


def _pgolf_step(model, optimizers, cfg, grads, step, scale):
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    set_muon_momentum(optimizers, muon_momentum_at(step, cfg.train))
    set_lr_scale(optimizers, scale)
    clip_grads(model.parameters(), cfg.train.grad_clip_norm)
    for opt in optimizers:
        opt.step()


def test_five_steps_from_the_same_weights_and_gradients_give_the_same_weights(setup):
    preset, mod, cfg = setup
    torch.manual_seed(1)
    ref = official_model(mod)
    model = pgolf_model_like(cfg, mod, ref)
    theirs_opt = official_optimizers(mod, ref)
    ours_opt = build_optimizers(model, cfg.train, cfg.model.tie_embeddings)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad(), bf16_as_fp32(mod):
        for step, scale, std in zip(STEPS, LR_SCALES, GRAD_STDS, strict=True):
            grads = {
                n: torch.randn(p.shape, generator=gen) * std for n, p in model.named_parameters()
            }
            _official_step(mod, ref, theirs_opt, rebank(mod, grads, ref), step, scale)
            _pgolf_step(model, ours_opt, cfg, grads, step, scale)
    theirs = unbank(mod, ref.state_dict())
    for name, value in model.state_dict().items():
        assert_close(f"{preset} {name} after {len(STEPS)} steps", value, theirs[name], atol=1e-6)


BANKED = ("pr549", "pr1019", "pr1060", "seed-p1351")


def test_the_banked_presets_keep_muon_state_in_bf16_on_cuda_and_share_one_muon():
    """One check for the four: their scripts' Parallel Muon and Newton–Schulz are one code."""
    import ast

    from tests.parity.official import reference_path

    def tree(script: str, name: str) -> str:
        body = ast.parse(reference_path(script).read_text()).body
        return next(ast.dump(n) for n in body if getattr(n, "name", None) == name)

    scripts = [PRESET_SCRIPT[p] for p in BANKED]
    for name in ("Muon", "zeropower_via_newtonschulz5"):
        assert len({tree(s, name) for s in scripts}) == 1, f"{name} differs among {scripts}"
    assert all(pgolf_config(p).train.muon_bf16_state == "cuda" for p in BANKED)


def test_bf16_muon_state_steps_as_the_banked_scripts_own_bf16_muon():
    """`train.muon_bf16_state`, forced on: pgolf's Muon keeps the gradient copy, momentum and
    Newton–Schulz in bf16 as S549's Parallel Muon does, here run as written (no fp32 shim). Only
    Muon steps, so Adam's fp32 arithmetic is apart. Three steps: CPU bf16 matmuls are emulated."""
    mod, cfg = load_script(PRESET_SCRIPT["pr549"]), pgolf_config("pr549")
    cfg.train.muon_bf16_state = "on"
    torch.manual_seed(1)
    ref = official_model(mod)
    model = pgolf_model_like(cfg, mod, ref)
    theirs_opt = official_optimizers(mod, ref)["muon"]
    ours_opt = next(o for o in build_optimizers(model, cfg.train, True) if isinstance(o, Muon))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for step, scale in zip(STEPS[1:4], LR_SCALES[1:4], strict=True):
            grads = {
                n: torch.randn(p.shape, generator=gen) * 1e-2 for n, p in model.named_parameters()
            }
            banked = rebank(mod, grads, ref)
            for name, p in ref.named_parameters():
                p.grad = banked[name].clone()
            for name, p in model.named_parameters():
                p.grad = grads[name].clone()
            for opt, momentum in ((theirs_opt, _official_momentum(mod.args, step)),
                                  (ours_opt, muon_momentum_at(step, cfg.train))):  # fmt: skip
                for group in opt.param_groups:
                    group["momentum"], group["lr"] = momentum, group["base_lr"] * scale
            theirs_opt.step()
            ours_opt.step()
    theirs = unbank(mod, ref.state_dict())
    for name, value in model.state_dict().items():
        assert_close(f"pr549 {name} after bf16 Muon", value, theirs[name], atol=1e-6)
