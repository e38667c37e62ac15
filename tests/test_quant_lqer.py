"""LQER, the low-rank correction of the quantisation error (SPEC §5.19, §5.31), and TOP's int8
attention gate expressed as a quant override."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pgolf.artifact.container import pack_sections, read_artifact, unpack_artifact
from pgolf.artifact.int8 import SCALE_SUFFIX
from pgolf.artifact.load import dequantize_artifact
from pgolf.artifact.mixed import FACTOR_A, FACTOR_B, dequantize_groups, dequantize_mixed
from pgolf.config import resolve_config
from pgolf.errors import PgolfError
from pgolf.model.gpt import GPT
from pgolf.quant.config import QuantConfig
from pgolf.quant.grid import dequantize
from pgolf.quant.hessian import collect_hessians
from pgolf.quant.lqer import error_factors, factor_grids, quantize_groups
from pgolf.quant.pipeline import hessian_names, quantize_and_pack
from pgolf.quant.policy import plan_tensors
from pgolf.quant.quantize import quantize_model, quantize_state
from tests.test_quant_mixed import small_model


def lqer_cfg(**kw) -> QuantConfig:
    base = QuantConfig(codec="mixed", keep_float_max_numel=1024, lqer=True, lqer_top_k=2)
    return dataclasses.replace(base, **kw)


def gated_model() -> GPT:
    """2 layers × 64 with TOP's sparse attention gate (4 heads × 12 inputs = 48 weights)."""
    return small_model(attn_out_gate=True)


def synthetic_state() -> tuple[dict, dict]:
    """Three matrices of clearly different error norms, and a small one made int by override."""
    g = torch.Generator().manual_seed(0)
    state = {
        "blocks.0.mlp.fc.weight": torch.randn(96, 64, generator=g) * 0.02,
        "blocks.0.attn.c_q.weight": torch.randn(64, 64, generator=g) * 0.2,
        "blocks.0.mlp.proj.weight": torch.randn(64, 96, generator=g) * 0.05,
        "blocks.0.attn.gate_w": torch.randn(4, 12, generator=g) * 50.0,  # a huge error at int5
    }
    roles = {n: "matrix" for n in state} | {"blocks.0.attn.gate_w": "scalar"}
    return state, roles


def _correction(arrays: dict[str, np.ndarray], name: str) -> torch.Tensor:
    a, b = (
        dequantize_groups(
            torch.from_numpy(arrays[name + k]),
            torch.from_numpy(arrays[name + k + SCALE_SUFFIX]).float(),
        )
        for k in (FACTOR_A, FACTOR_B)
    )
    return a @ b


def test_exact_factors_remove_the_top_r_singular_values_of_the_error():
    e = torch.randn(80, 48, generator=torch.Generator().manual_seed(1)) * 0.01
    sigma = torch.linalg.svdvals(e.double())
    for rank in (1, 4, 48):
        a, b = error_factors(e, rank)
        assert a.shape == (80, rank) and b.shape == (rank, 48)
        left = float((e.double() - a.double() @ b.double()).square().sum())
        # Eckart–Young: what is left is exactly the energy of the discarded singular values.
        assert left == pytest.approx(float(sigma[rank:].square().sum()), rel=1e-4, abs=1e-9)
        removed = float(e.double().square().sum()) - left
        assert removed == pytest.approx(float(sigma[:rank].square().sum()), rel=1e-5)


def test_factor_grids_are_tops_int2_int4_layout_or_symmetric_rows():
    cfg = lqer_cfg()
    assert factor_grids(cfg, 96, 64, 4) == ("asym", (384, -2, 1), (64, -8, 7))
    # 4 · 60 = 240 entries of B are not whole groups of 64: the symmetric per-row layout instead.
    assert factor_grids(cfg, 96, 60, 4) == ("sym", (4, -7, 7), (60, -7, 7))
    sym6 = lqer_cfg(lqer_asymmetric=False, lqer_factor_bits=6)
    assert factor_grids(sym6, 96, 64, 4) == ("sym", (4, -31, 31), (64, -31, 31))


def test_group_quantization_stays_on_its_grid_and_rounds_against_the_stored_scale():
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(2))
    q, s = quantize_groups(x, 64, -8, 7)
    assert q.dtype == torch.int8 and s.shape == (6,)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    assert torch.equal(s, s.half().float())  # float16-exact: the decoder multiplies by these
    groups = x.reshape(6, 64)
    assert torch.equal(s, (groups.abs().amax(1) / 7.5).half().float())
    back = dequantize_groups(q, s).reshape(6, 64)
    inside = groups <= 7 * s[:, None]  # the largest positive entry sits at 7.5 and clamps
    assert ((back - groups).abs()[inside] <= s[:, None].expand_as(groups)[inside] / 2 + 1e-7).all()
    qa, sa = quantize_groups(x, x.numel(), -2, 1)
    assert sa.shape == (1,) and set(qa.unique().tolist()) <= {-2, -1, 0, 1}


def test_lqer_corrects_the_top_k_matrices_by_error_norm_and_only_those():
    state, roles = synthetic_state()
    cfg = lqer_cfg(quant_overrides="*.gate_w=int5-gptq:rowmax", keep_float_max_numel=100)
    qm = quantize_state(state, roles, cfg)
    norms = {}
    for name in qm.meta["tensors"]:
        q, s = (torch.from_numpy(qm.arrays[name + k]) for k in ("", SCALE_SUFFIX))
        norms[name] = float((state[name] - dequantize(q, s.float())).norm())
    big = [n for n in norms if state[n].numel() > 100]
    expected = sorted(big, key=lambda n: -norms[n])[:2]
    corrected = [n for n, e in qm.meta["tensors"].items() if "lqer" in e]
    assert sorted(corrected) == sorted(expected)
    # The gate is int only by override (48 weights): never a candidate, whatever its error.
    assert norms["blocks.0.attn.gate_w"] > max(norms[n] for n in big)
    assert "lqer" not in qm.meta["tensors"]["blocks.0.attn.gate_w"]
    restored = dequantize_mixed(qm.arrays, qm.meta)
    for name in corrected:
        st = qm.stats[name]["lqer"]
        assert st["error_norm"] == pytest.approx(norms[name], rel=1e-6)
        sigma = torch.linalg.svdvals(state[name] - (restored[name] - _correction(qm.arrays, name)))
        assert st["error_norm_exact_factors"] == pytest.approx(
            float(sigma[4:].square().sum().sqrt()), rel=1e-4
        )
        after = float((state[name] - restored[name]).norm())
        assert after == pytest.approx(st["error_norm_corrected"], rel=1e-5)
        assert st["error_norm_exact_factors"] < after < norms[name]


def test_lqer_round_trips_through_the_artifact_bit_exactly_and_its_bytes_count(tmp_path):
    model = gated_model()
    cfg = lqer_cfg(quant_overrides="*.attn.gate_w=int8-gptq:rowmax")
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(1))
    hessians = collect_hessians(model, [ids], hessian_names(model, cfg))
    path = tmp_path / "artifact.pgolf"
    report = quantize_and_pack(model, cfg, hessians, (10_000, "test"), path=path)
    plain = quantize_and_pack(
        model, dataclasses.replace(cfg, lqer=False), hessians, (10_000, "test")
    )
    arrays, meta = read_artifact(path)
    corrected = [n for n, e in meta["tensors"].items() if "lqer" in e]
    assert len(corrected) == 2
    state = dequantize_artifact(arrays, meta)
    for name in corrected:
        q, s = (torch.from_numpy(arrays[name + k]) for k in ("", SCALE_SUFFIX))
        deq = q.float() * s.float()[:, None]
        assert torch.equal(state[name], deq + _correction(arrays, name))
        assert not torch.equal(state[name], deq)
    qm = quantize_model(model, cfg, hessians)
    direct = dequantize_mixed(qm.arrays, qm.meta)
    assert all(torch.equal(direct[n], state[n]) for n in direct)
    fresh = GPT(model.cfg)
    fresh.load_state_dict(state, strict=True)
    # The factors are in the packed bytes the fitter holds to the target, and reported as such.
    assert report["bytes_model"] == path.stat().st_size
    assert report["bytes_model"] > plain["bytes_model"]
    assert report["bytes_per_class"]["lqer"] > 0 and "lqer" not in plain["bytes_per_class"]
    factor_raw = sum(
        arrays[n + k + x].nbytes for n in corrected for k in (FACTOR_A, FACTOR_B)
        for x in ("", SCALE_SUFFIX)
    )  # fmt: skip
    assert factor_raw > 0 and report["bytes_model"] - plain["bytes_model"] <= factor_raw + 200
    # The int8 gate: per row at the row maximum, no Hessian.
    gate = "blocks.0.attn.gate_w"
    q, s = torch.from_numpy(arrays[gate]), torch.from_numpy(arrays[gate + SCALE_SUFFIX]).float()
    w = model.state_dict()[gate]
    assert meta["tensors"][gate]["bits"] == 8 and int(q.abs().max()) == 127
    assert torch.equal(s, (w.abs().amax(1) / 127).half().float())


def test_missing_or_malformed_factors_are_refused():
    state, roles = synthetic_state()
    qm = quantize_state(state, roles, lqer_cfg(lqer_top_k=1))
    name = next(n for n, e in qm.meta["tensors"].items() if "lqer" in e)
    arrays, meta = unpack_artifact(pack_sections(qm.arrays, qm.meta).data)
    broken = {k: v for k, v in arrays.items() if k != name + FACTOR_B}
    with pytest.raises(PgolfError, match="LQER factor"):
        dequantize_artifact(broken, meta)
    meta["tensors"][name]["lqer"]["rank"] = 5
    with pytest.raises(PgolfError, match="LQER factor"):
        dequantize_artifact(arrays, meta)
    meta["tensors"][name]["lqer"] = {"rank": 4, "layout": "pickle"}
    with pytest.raises(PgolfError, match="invalid LQER entry"):
        dequantize_artifact(arrays, meta)


@pytest.mark.parametrize(
    ("field", "value"), [("lqer_rank", 0), ("lqer_top_k", 0), ("lqer_factor_bits", 9)]
)
def test_bad_lqer_settings_are_refused(field, value):
    state, roles = synthetic_state()
    with pytest.raises(PgolfError, match=field):
        quantize_state(state, roles, lqer_cfg(**{field: value}))


def test_lqer_is_off_by_default_and_settable_by_tops_environment_names():
    assert QuantConfig().lqer is False
    cfg = resolve_config(
        "baseline",
        ["quant.codec=mixed"],
        environ={
            "LQER_ENABLED": "1",
            "LQER_RANK": "2",
            "LQER_TOP_K": "5",
            "LQER_ASYM_ENABLED": "0",
        },
    )
    ex = cfg.quant
    assert (ex.lqer, ex.lqer_rank, ex.lqer_top_k, ex.lqer_asymmetric) == (True, 2, 5, False)


def test_override_clip_suffix_sets_the_clip_method_and_bad_ones_are_refused():
    model = gated_model()
    state = model.state_dict()
    roles = {n: p._pgolf_role for n, p in model.named_parameters()}
    plans = plan_tensors(state, roles, lqer_cfg(quant_overrides="*.gate_w=int8-gptq:rowmax"))
    gate = plans["blocks.1.attn.gate_w"]
    assert (gate.scheme, gate.bits, gate.gptq, gate.clip.method) == ("int", 8, False, "rowmax")
    assert plans["blocks.1.attn.c_q.weight"].clip.method == "sdclip"
    with pytest.raises(PgolfError, match="quant_overrides"):
        plan_tensors(state, roles, lqer_cfg(quant_overrides="*.gate_w=int8:nearest"))
