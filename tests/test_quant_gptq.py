"""Grids, clip rules and GPTQ (SPEC §5.19–5.22), checked against a plain float64 reference."""

from __future__ import annotations

import pytest
import torch

from pgolf.quant import clip as cliprules
from pgolf.quant.gptq import ClipRule, GPTQOptions, gptq_sweep, hessian_error, quantize_matrix
from pgolf.quant.grid import dequantize, qmax_for, quantize_rtn, to_fp16_scale


def correlated_inputs(n: int, d: int, seed: int, mix_seed: int = 0) -> torch.Tensor:
    """Samples (seeded by `seed`) of one fixed correlated distribution (fixed by `mix_seed`)."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(mix_seed)) / d**0.5
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix
    x[:, :4] *= 8  # a few hot channels, as real activations have
    return x


def reference_gptq(w, h, scale, qmax, damp=0.01, order="desc", feedback="cholesky"):
    """Textbook GPTQ in float64, one column at a time, no blocking, no laziness."""
    w = w.double().clone()
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=torch.float64)
    if order == "natural":
        perm = torch.arange(h.shape[0])
    else:
        perm = torch.argsort(torch.diag(h), descending=order == "desc", stable=True)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = torch.linalg.inv(h)
    f = torch.linalg.cholesky(hinv).T if feedback == "cholesky" else hinv
    s = scale.double()
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        q[:, j] = torch.clamp(torch.round(w[:, j] / s), -qmax, qmax)
        err = (w[:, j] - q[:, j] * s) / f[j, j]
        w[:, j:] -= torch.outer(err, f[j, j:])
    return q[:, torch.argsort(perm)].to(torch.int8)


# --- grids --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "qmax"), [(5, 15), (6, 31), (7, 63), (8, 127)])
def test_grid_is_symmetric_with_the_records_ranges(bits, qmax):
    assert qmax_for(bits) == qmax
    w = torch.randn(16, 300) * 5
    scale = to_fp16_scale(w.abs().amax(dim=1) / qmax / 2)  # half the rows' range: many clamps
    q = quantize_rtn(w, scale, qmax)
    assert q.dtype == torch.int8 and int(q.max()) == qmax and int(q.min()) == -qmax


def test_unsupported_bit_width_is_refused():
    for bits in (4, 9):
        with pytest.raises(ValueError, match="unsupported bit width"):
            qmax_for(bits)


def test_rtn_is_within_half_a_step_and_dequantisation_is_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 257, generator=g) * torch.logspace(-4, 1, 64)[:, None]
    scale = to_fp16_scale(w.abs().amax(dim=1) / 31)
    assert torch.equal(scale, scale.half().float())  # the stored float16 value exactly
    q = quantize_rtn(w, scale, 31)
    w_hat = dequantize(q, scale)
    assert torch.equal(w_hat.double(), q.double() * scale.double()[:, None])  # exact in float32
    assert bool(((w_hat - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all())


def test_zero_rows_get_a_positive_scale_and_zero_integers():
    w = torch.zeros(3, 100)
    scale = cliprules.sdclip_scales(w, 31, 12.85)
    assert bool((scale > 0).all()) and not quantize_rtn(w, scale, 31).any()


# --- clip rules ---------------------------------------------------------------------------------


def test_percentile_and_sdclip_scales_follow_their_formulas():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 512, generator=g)
    expected = torch.quantile(w.abs(), 0.999, dim=1) / 31
    assert torch.equal(cliprules.percentile_scales(w, 31, 0.999), to_fp16_scale(expected))
    assert torch.equal(cliprules.percentile_scales(w, 31, 1.0), to_fp16_scale(w.abs().amax(1) / 31))
    assert torch.equal(
        cliprules.sdclip_scales(w, 31, 12.85), to_fp16_scale(12.85 * w.std(dim=1) / 31)
    )


def test_gptq_lite_search_picks_the_lowest_rtn_error_per_matrix_or_per_row():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 512, generator=g)
    w[::5, 7] = 40.0  # outlier rows that want a tighter clip than the rest
    scale, info = cliprules.search_scales(w, 31)
    errs = {
        q: float(cliprules.rtn_mse(w, cliprules.percentile_scales(w, 31, q), 31).mean())
        for q in cliprules.SEARCH_QUANTILES
    }
    assert info["clip_quantile"] == min(errs, key=errs.get)
    row_scale, _ = cliprules.search_scales(w, 31, per_row=True)
    assert float(cliprules.rtn_mse(w, row_scale, 31).mean()) <= min(errs.values()) + 1e-12


def test_hessian_aware_sdclip_reduces_to_sdclip_without_lambda_and_widens_hot_rows():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g)
    x = correlated_inputs(512, 64, 3)
    h = x.T @ x / 512
    plain = cliprules.sdclip_scales(w, 31, 12.0)
    assert torch.equal(cliprules.hsdclip_scales(w, h, 31, 12.0, 0.0), plain)
    rho = cliprules.row_importance(w, h)
    assert abs(float(rho.mean()) - 1) < 1e-5
    wide = cliprules.hsdclip_scales(w, h, 31, 12.0, 0.5)
    hot, cold = int(rho.argmax()), int(rho.argmin())
    assert wide[hot] > plain[hot] and wide[cold] < plain[cold]


# --- GPTQ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "feedback"),
    [("desc", "cholesky"), ("natural", "cholesky"), ("asc", "cholesky"), ("natural", "raw")],
)
def test_gptq_matches_the_float64_reference(order, feedback):
    g = torch.Generator().manual_seed(4)
    d_in = 96
    x = correlated_inputs(4 * d_in, d_in, 4)
    x[:, 5] = 0  # one dead input column
    h = x.T @ x
    w = torch.randn(40, d_in, generator=g) * 0.05
    scale = cliprules.percentile_scales(w, 31, 1.0)
    ref = reference_gptq(w, h, scale, 31, order=order, feedback=feedback)
    opts = GPTQOptions(order=order, feedback=feedback, block_size=32, dtype=torch.float64)
    q64, stats = gptq_sweep(w, h, scale, 31, opts)
    assert torch.equal(q64, ref)  # float64 blocked sweep == float64 textbook loop, bit for bit
    assert stats["dead_columns"] == 1 and stats["fallback"] is None and not q64[:, 5].any()
    q32, _ = gptq_sweep(w, h, scale, 31, GPTQOptions(order=order, feedback=feedback))
    # float32 may round a handful of near-ties the other way: "within rounding".
    assert float((q32 != ref).float().mean()) < 0.01
    assert int((q32.int() - ref.int()).abs().max()) <= 1


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_gptq_beats_round_to_nearest_on_held_out_activations(bits):
    d_in, d_out = 128, 64
    calib = correlated_inputs(2 * d_in, d_in, 5)  # calibration rows = 2 × input dim
    held_out = correlated_inputs(2048, d_in, 6)
    w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(7)) * 0.05
    h = calib.T @ calib / len(calib)
    rule = ClipRule("rowmax")
    q_g, s_g, _ = quantize_matrix(w, h, bits, rule, GPTQOptions())
    q_r, s_r, _ = quantize_matrix(w, h, bits, rule, None)

    def output_error(q, s):
        return float((held_out @ (dequantize(q, s) - w).T).square().mean())

    assert output_error(q_g, s_g) < 0.8 * output_error(q_r, s_r)


def test_blocking_does_not_change_the_result():
    x = correlated_inputs(400, 200, 8)
    h = x.T @ x
    w = torch.randn(30, 200, generator=torch.Generator().manual_seed(8))
    scale = cliprules.sdclip_scales(w, 31, 12.85)
    outs = [
        gptq_sweep(w, h, scale, 31, GPTQOptions(block_size=b, dtype=torch.float64))[0]
        for b in (1, 7, 128, 1000)
    ]
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_cholesky_failure_escalates_damping_then_falls_back_and_says_so():
    w = torch.randn(8, 16)
    scale = cliprules.sdclip_scales(w, 31, 12.85)
    # Indefinite but with a positive mean diagonal: damping eventually rescues it, and says so.
    h = torch.eye(16)
    h[0, 0] = -0.5
    q, stats = gptq_sweep(w, h, scale, 31)
    assert stats["fallback"] is None and stats["damp_retries"] >= 1 and stats["damp"] > 0.01
    # Negative definite: no damping helps; the matrix is rounded to nearest, on the record.
    q, stats = gptq_sweep(w, -torch.eye(16), scale, 31)
    assert "Cholesky failed" in stats["fallback"]
    assert torch.equal(q, quantize_rtn(w, scale, 31))


def test_five_candidate_search_keeps_the_lowest_weight_mse_and_refit_never_hurts():
    x = correlated_inputs(256, 64, 9)
    h = x.T @ x
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(9))
    q, s, st = quantize_matrix(w, h, 6, ClipRule("search-gptq"), GPTQOptions())
    for quant in cliprules.SEARCH_QUANTILES:
        q_c, s_c, st_c = quantize_matrix(
            w, h, 6, ClipRule("percentile", percentile=quant), GPTQOptions()
        )
        assert st["mse"] <= st_c["mse"] + 1e-12
    _, _, refit = quantize_matrix(w, h, 6, ClipRule("rowmax"), GPTQOptions(refit_scales=True))
    _, _, plain = quantize_matrix(w, h, 6, ClipRule("rowmax"), GPTQOptions())
    assert refit["mse"] <= plain["mse"] and refit["refit_rows"] >= 0


def test_exact_feedback_beats_the_raw_inverse_shortcut():
    x = correlated_inputs(1024, 128, 10)
    h = x.T @ x / 1024
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(10)) * 0.05
    rule = ClipRule("rowmax")
    errs = {
        fb: quantize_matrix(w, h, 6, rule, GPTQOptions(feedback=fb))[2]["hessian_error"]
        for fb in ("cholesky", "raw")
    }
    assert errs["cholesky"] < errs["raw"]
    q, s, _ = quantize_matrix(w, h, 6, rule, None)
    assert errs["raw"] < hessian_error(w, dequantize(q, s), h)
