"""Optimiser, LR schedule and momentum warm-up of the baseline (SPEC §4.4–§4.5)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pgolf.config import TrainConfig
from pgolf.model.roles import with_role
from pgolf.train.muon import (
    NS5_COEFFS,
    POLAR_EXPRESS_COEFFS,
    Muon,
    normalize_rows,
    zeropower_newton_schulz5,
    zeropower_polar_express,
)
from pgolf.train.optim import (
    build_optimizers,
    clip_grads,
    muon_momentum_at,
    set_lr_scale,
    set_muon_momentum,
)
from pgolf.train.schedule import (
    frac_warmdown_scale,
    lr_scale,
    scheduled_lr_scale,
    training_frac,
    warmdown_scale,
    warmup_factor,
)
from tests.conftest import free_port


def ns5_reference(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """SPEC §4.4 NS5 written out plainly, in float64."""
    a, b, c = NS5_COEFFS
    X = G.double() / (torch.linalg.matrix_norm(G.double()) + 1e-7)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


# --- Newton–Schulz ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_ns5_keeps_shape_and_puts_singular_values_near_one(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    O = zeropower_newton_schulz5(G, steps=5)
    assert O.shape == G.shape and O.dtype == torch.float32
    sv = torch.linalg.svdvals(O.double())
    # The quintic's fixed points oscillate around 1 rather than converging (Muon: S' ~ U(0.5, 1.5)).
    assert sv.min() > 0.5 and sv.max() < 1.5
    # …and it really is orthogonalising: the input's singular values spread far wider.
    sv_in = torch.linalg.svdvals(G.double())
    assert sv_in.max() / sv_in.min() > 3
    torch.testing.assert_close(O.double(), ns5_reference(G), atol=1e-5, rtol=0)


def test_ns5_ignores_the_input_scale():
    G = torch.randn(16, 24, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        zeropower_newton_schulz5(G, 5), zeropower_newton_schulz5(1000 * G, 5), atol=1e-5, rtol=0
    )


# --- Muon ------------------------------------------------------------------------------------


def test_muon_two_steps_match_hand_computed_nesterov_momentum_and_tall_scale():
    gen = torch.Generator().manual_seed(2)
    W0 = torch.randn(8, 2, generator=gen)
    G1, G2 = torch.randn(8, 2, generator=gen), torch.randn(8, 2, generator=gen)
    lr, mu = 0.1, 0.9
    W = nn.Parameter(W0.clone())
    opt = Muon([W], lr=lr, momentum=mu, backend_steps=5)
    for G in (G1, G2):
        W.grad = G.clone()
        opt.step()

    # NS5 is scale-invariant, so only a second, non-parallel gradient can expose a wrong momentum.
    buf1 = G1
    U1 = G1 + mu * buf1
    buf2 = mu * buf1 + G2
    U2 = G2 + mu * buf2
    scale = math.sqrt(8 / 2)
    expected = W0.double() - lr * scale * (ns5_reference(U1) + ns5_reference(U2))
    torch.testing.assert_close(W.detach().double(), expected, atol=1e-5, rtol=0)


def test_muon_scales_tall_updates_by_sqrt_aspect_and_leaves_wide_ones_alone():
    G = torch.randn(3, 12, generator=torch.Generator().manual_seed(3))
    wide = nn.Parameter(torch.zeros(3, 12))
    tall = nn.Parameter(torch.zeros(12, 3))
    opt = Muon([wide, tall], lr=1.0, momentum=0.0, backend_steps=5)
    wide.grad, tall.grad = G.clone(), G.T.clone()
    opt.step()
    torch.testing.assert_close(-wide.detach(), zeropower_newton_schulz5(G, 5))
    torch.testing.assert_close(tall.detach(), 2.0 * wide.detach().T)


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="matrices"):
        Muon([nn.Parameter(torch.zeros(4))], lr=0.1, momentum=0.9, backend_steps=5)


# --- routing ---------------------------------------------------------------------------------


class TinyModel(nn.Module):
    def __init__(self, with_head: bool = True):
        super().__init__()
        self.embed = with_role(nn.Parameter(torch.randn(10, 4)), "embedding")
        self.fc = with_role(nn.Parameter(torch.randn(4, 4)), "matrix")
        self.proj = with_role(nn.Parameter(torch.randn(8, 4)), "matrix")
        self.gain = with_role(nn.Parameter(torch.ones(4)), "scalar")
        if with_head:
            self.head = with_role(nn.Parameter(torch.randn(10, 4)), "head")


def _owner(optimizers, param):
    found = [
        (opt, group)
        for opt in optimizers
        for group in opt.param_groups
        if any(p is param for p in group["params"])
    ]
    assert len(found) == 1, "every parameter belongs to exactly one optimizer"
    return found[0]


def test_each_role_lands_in_its_optimizer_with_its_lr():
    cfg = TrainConfig()
    model = TinyModel()
    optimizers = build_optimizers(model, cfg, tie_embeddings=False)
    assert len(optimizers) == 4
    expected = {
        "embed": (torch.optim.Adam, cfg.embed_lr),
        "head": (torch.optim.Adam, cfg.head_lr),
        "fc": (Muon, cfg.matrix_lr),
        "proj": (Muon, cfg.matrix_lr),
        "gain": (torch.optim.Adam, cfg.scalar_lr),
    }
    for name, (kind, lr) in expected.items():
        opt, group = _owner(optimizers, getattr(model, name))
        assert type(opt) is kind, name
        assert group["lr"] == group["base_lr"] == lr, name
    muon = next(o for o in optimizers if isinstance(o, Muon))
    assert muon.param_groups[0]["momentum"] == cfg.muon_momentum
    assert muon.param_groups[0]["backend_steps"] == cfg.muon_backend_steps
    adam = _owner(optimizers, model.gain)[0]
    assert adam.defaults["betas"] == (cfg.beta1, cfg.beta2)
    assert adam.defaults["eps"] == cfg.adam_eps and adam.defaults["weight_decay"] == 0.0
    assert not adam.defaults["fused"]  # CPU tensors: the fused kernel is CUDA-only


def test_tied_embedding_uses_tied_lr_and_empty_roles_get_no_optimizer():
    cfg = TrainConfig(tied_embed_lr=0.05, embed_lr=0.6)
    model = TinyModel(with_head=False)
    optimizers = build_optimizers(model, cfg, tie_embeddings=True)
    assert len(optimizers) == 3
    assert _owner(optimizers, model.embed)[1]["lr"] == 0.05


def test_lr_scale_and_momentum_setters_touch_the_right_groups():
    cfg = TrainConfig()
    optimizers = build_optimizers(TinyModel(), cfg, tie_embeddings=False)
    set_lr_scale(optimizers, 0.25)
    for opt in optimizers:
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(0.25 * group["base_lr"])
    set_muon_momentum(optimizers, 0.5)
    for opt in optimizers:
        if isinstance(opt, Muon):
            assert opt.param_groups[0]["momentum"] == 0.5
        else:
            assert "momentum" not in opt.param_groups[0]


def test_optimizers_reduce_a_simple_loss():
    torch.manual_seed(0)
    model = TinyModel()
    optimizers = build_optimizers(model, TrainConfig(), tie_embeddings=False)

    def loss_fn():
        return sum((p.float() ** 2).sum() for p in model.parameters())

    before = loss_fn().item()
    for _ in range(5):
        loss = loss_fn()
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    assert loss_fn().item() < before


def test_grad_clipping_is_off_at_zero_and_global_when_positive():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    expected = (3 * 9 + 4 * 16) ** 0.5
    assert clip_grads([a, b], 0.0) is None
    assert clip_grads([a, b], 0.0, measure=True) == pytest.approx(expected, rel=1e-6)
    assert a.grad[0] == 3.0  # measuring never clips
    assert clip_grads([a, b], 1.0, measure=True) == pytest.approx(expected, rel=1e-6)  # pre-clip
    total = torch.cat([a.grad, b.grad]).norm()
    assert total == pytest.approx(1.0, rel=1e-5)


# --- schedules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "step, expected", [(0, 1.0), (299, 1.0), (300, 1.0), (350, 0.5), (399, 0.01), (400, 1.0)]
)
def test_iteration_warmdown_is_linear_over_the_last_warmdown_iters(step, expected):
    scale = lr_scale(step, 0.0, iterations=400, warmdown_iters=100, max_wallclock_ms=None)
    assert scale == pytest.approx(expected)
    assert lr_scale(step, 0.0, 400, 100, 0) == scale  # a cap of 0 also means "no cap"


def test_warmdown_longer_than_the_run_starts_decaying_at_step_zero():
    assert lr_scale(0, 0.0, iterations=50, warmdown_iters=100, max_wallclock_ms=None) == 0.5


def test_no_warmdown_means_constant_lr():
    assert lr_scale(399, 9e9, iterations=400, warmdown_iters=0, max_wallclock_ms=1000) == 1.0


@pytest.mark.parametrize(
    "step, elapsed_ms, expected",
    [
        (0, 0.0, 1.0),  # nothing timed yet
        (10, 500.0, 1.0),  # 50 ms/step → 200 ms window; 500 ms remain
        (15, 750.0, 1.0),  # 250 ms remain
        (16, 800.0, 1.0),  # exactly the window: 200 / 200
        (18, 900.0, 0.5),
        (19, 950.0, 0.25),
        (20, 1000.0, 0.0),  # the cap: decayed to zero
        (21, 1050.0, 0.0),  # past it: never negative
    ],
)
def test_wallclock_warmdown_predicts_the_window_from_the_average_step(step, elapsed_ms, expected):
    scale = lr_scale(step, elapsed_ms, iterations=10_000, warmdown_iters=4, max_wallclock_ms=1000)
    assert scale == pytest.approx(expected)


@pytest.mark.parametrize(
    "frac, expected",
    [(0.0, 1.0), (0.3, 1.0), (0.333, 1.0), (0.5, 0.5 / 0.667), (0.9, 0.1 / 0.667), (1.0, 0.0)],
)
def test_wallclock_fraction_warmdown_of_s1394(frac, expected):
    assert frac_warmdown_scale(frac, 0.667, 0.0) == pytest.approx(expected)


def test_min_lr_floors_the_fraction_warmdown():
    assert frac_warmdown_scale(0.99, 0.85, 0.10) == pytest.approx(0.10)  # TOP: (0.01/0.85) → 0.1
    assert frac_warmdown_scale(0.50, 0.85, 0.10) == pytest.approx(0.5 / 0.85)
    assert frac_warmdown_scale(0.99, 0.0, 0.10) == 1.0  # no warm-down, no floor


def test_training_frac_is_time_over_the_effective_cap_else_steps_over_iterations():
    assert training_frac(10, 294_000.0, 20_000, 588_000.0) == pytest.approx(0.5)
    assert training_frac(100, 9e9, 400, None) == 0.25


def test_scheduled_scale_combines_warmdown_floor_and_warmup():
    cfg = TrainConfig(iterations=100, warmdown_frac=0.5, min_lr=0.2, lr_warmup_steps=10)
    assert scheduled_lr_scale(cfg, 0, 0.0, None) == pytest.approx(0.1)  # warm-up 1/10
    # LR-keyed switches (SWA start, late QAT) see the warm-down alone, not the warm-up.
    assert warmdown_scale(cfg, 0, 0.0, None) == 1.0
    assert scheduled_lr_scale(cfg, 9, 0.0, None) == pytest.approx(1.0)
    assert scheduled_lr_scale(cfg, 75, 0.0, None) == pytest.approx(0.5)  # (1 − .75)/.5
    assert scheduled_lr_scale(cfg, 95, 0.0, None) == pytest.approx(0.2)  # floored
    # Under a cap the fraction is the time fraction: 450 of 600 ms → frac 0.75 → 0.5.
    assert scheduled_lr_scale(cfg, 50, 450.0, 600.0) == pytest.approx(0.25 / 0.5)
    base = TrainConfig(iterations=400, warmdown_iters=100)
    assert scheduled_lr_scale(base, 350, 0.0, None) == lr_scale(350, 0.0, 400, 100, None)
    assert warmup_factor(5, 0) == 1.0


def test_muon_momentum_warms_up_linearly_then_stays():
    cfg = TrainConfig(
        muon_momentum=0.95, muon_momentum_warmup_start=0.85, muon_momentum_warmup_steps=500
    )
    assert muon_momentum_at(0, cfg) == pytest.approx(0.85)
    assert muon_momentum_at(250, cfg) == pytest.approx(0.90)
    assert muon_momentum_at(500, cfg) == pytest.approx(0.95)
    assert muon_momentum_at(5000, cfg) == pytest.approx(0.95)
    cfg.muon_momentum_warmup_steps = 0
    assert muon_momentum_at(0, cfg) == 0.95


# --- Muon variants and weight decay (SPEC §5.17) ------------------------------------------------


def test_muon_decoupled_weight_decay_shrinks_weights_by_one_minus_lr_wd():
    gen = torch.Generator().manual_seed(5)
    W0, G = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    lr, wd = 0.1, 0.3
    # A zero gradient orthogonalises to a zero update: only the decay moves the weights.
    W = nn.Parameter(W0.clone())
    opt = Muon([W], lr=lr, momentum=0.9, backend_steps=5, weight_decay=wd)
    W.grad = torch.zeros_like(W0)
    opt.step()
    torch.testing.assert_close(W.detach(), W0 * (1 - lr * wd), rtol=0, atol=0)
    # With a gradient: decay first, then the plain Muon step.
    W, plain = nn.Parameter(W0.clone()), nn.Parameter(W0.clone())
    for p, decay in ((W, wd), (plain, 0.0)):
        p.grad = G.clone()
        Muon([p], lr=lr, momentum=0.9, backend_steps=5, weight_decay=decay).step()
    step = plain.detach() - W0
    torch.testing.assert_close(W.detach(), W0 * (1 - lr * wd) + step, rtol=0, atol=1e-6)


def test_muoneq_r_orthogonalises_the_row_normalised_update():
    gen = torch.Generator().manual_seed(6)
    W0 = torch.randn(8, 4, generator=gen)
    G = torch.randn(8, 4, generator=gen) * torch.logspace(0, 3, 8)[:, None]  # rows 1 … 1000
    mu, lr = 0.9, 0.1
    W = nn.Parameter(W0.clone())
    W.grad = G.clone()
    Muon([W], lr=lr, momentum=mu, backend_steps=5, row_normalize=True).step()
    U = G + mu * G  # Nesterov on the first step: buffer = G
    rows = U / U.norm(dim=1, keepdim=True)
    assert torch.allclose(normalize_rows(U).norm(dim=1), torch.ones(8))
    O = ns5_reference(rows).float() * (8 / 4) ** 0.5
    torch.testing.assert_close(W.detach(), W0 - lr * O, atol=1e-5, rtol=0)
    # Without it the huge rows dominate and the small ones barely move.
    plain = nn.Parameter(W0.clone())
    plain.grad = G.clone()
    Muon([plain], lr=lr, momentum=mu, backend_steps=5).step()
    moved = (plain.detach() - W0).norm(dim=1)
    assert moved[0] < 0.1 * moved[-1]
    assert (W.detach() - W0).norm(dim=1).min() > 0.3 * (W.detach() - W0).norm(dim=1).max()


def polar_express_reference(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Iteration i uses coefficient row i, after dividing by ‖G‖_F (as TOP); float64."""
    X = G.double() / (torch.linalg.matrix_norm(G.double()) + 1e-7)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for i in range(steps):
        a, b, c = POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)]
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def test_polar_express_uses_its_own_coefficients_at_each_iteration():
    G = torch.randn(48, 24, generator=torch.Generator().manual_seed(7))
    O = zeropower_polar_express(G, steps=5)
    torch.testing.assert_close(O.double(), polar_express_reference(G), atol=1e-5, rtol=0)
    # Any other order of the same rows gives a different map (the schedule is per iteration).
    X = G.double() / (torch.linalg.matrix_norm(G.double()) + 1e-7)
    X = X.T
    for a, b, c in reversed(POLAR_EXPRESS_COEFFS):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    assert (X.T - O.double()).abs().max() > 1e-2
    # Five tuned steps land closer to orthogonal than five fixed NS5 steps.
    pe = torch.linalg.svdvals(O.double())
    ns = torch.linalg.svdvals(zeropower_newton_schulz5(G, 5).double())
    assert (pe - 1).abs().max() < (ns - 1).abs().max()
    assert pe.min() > 0.8 and pe.max() < 1.2
    # Beyond five steps the last coefficients repeat.
    torch.testing.assert_close(
        zeropower_polar_express(G, 7).double(), polar_express_reference(G, 7), atol=1e-5, rtol=0
    )


def test_muon_switch_selects_polar_express():
    G = torch.randn(6, 4, generator=torch.Generator().manual_seed(8))
    W = nn.Parameter(torch.zeros(6, 4))
    W.grad = G.clone()
    Muon([W], lr=1.0, momentum=0.0, backend_steps=5, polar_express=True).step()
    expected = -zeropower_polar_express(G, 5) * (6 / 4) ** 0.5
    torch.testing.assert_close(W.detach(), expected, atol=1e-6, rtol=0)


def test_adamw_decay_on_embedding_and_scalars_and_switches_reach_muon():
    cfg = TrainConfig(
        embed_wd=0.085, adam_wd=0.02, muon_wd=0.04, muon_row_normalize=True, muon_polar_express=True
    )
    model = TinyModel()
    optimizers = build_optimizers(model, cfg, tie_embeddings=False)
    emb, _ = _owner(optimizers, model.embed)
    gain, _ = _owner(optimizers, model.gain)
    head, _ = _owner(optimizers, model.head)
    muon, _ = _owner(optimizers, model.fc)
    assert type(emb) is torch.optim.AdamW and emb.defaults["weight_decay"] == 0.085
    assert type(gain) is torch.optim.AdamW and gain.defaults["weight_decay"] == 0.02
    assert type(head) is torch.optim.Adam  # an untied head is not decayed (as upstream)
    group = muon.param_groups[0]
    assert group["weight_decay"] == 0.04 and group["row_normalize"] and group["polar_express"]
    # Decoupled: with a zero gradient AdamW only shrinks, by (1 − lr·wd).
    before = model.embed.detach().clone()
    model.embed.grad = torch.zeros_like(before)
    emb.step()
    lr = cfg.embed_lr
    torch.testing.assert_close(model.embed.detach(), before * (1 - lr * 0.085))


# --- distributed Muon ------------------------------------------------------------------------

SHAPES = [(6, 4), (4, 6), (12, 3), (5, 5), (2, 7)]


def _make_params_and_grads():
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(2)]
    return weights, grads


def _run_muon(weights, grads):
    params = [nn.Parameter(w.clone()) for w in weights]
    opt = Muon(params, lr=0.05, momentum=0.9, backend_steps=5)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def _distributed_worker(rank, world_size, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        weights, grads = _make_params_and_grads()
        torch.save(_run_muon(weights, grads), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_muon_splits_work_but_every_rank_ends_with_the_single_process_weights(tmp_path):
    world_size = 2
    mp.spawn(_distributed_worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size)
    weights, grads = _make_params_and_grads()
    expected = _run_muon(weights, grads)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for got in ranks:
        for w, e, w0 in zip(got, expected, weights, strict=True):
            assert not torch.equal(w, w0)
            torch.testing.assert_close(w, e, atol=1e-6, rtol=0)
    for a, b in zip(*ranks, strict=True):
        assert torch.equal(a, b)
