"""Mixed-precision quantisation by role (SPEC §5.19), fit to a decimal byte budget (§1.2, §5.24)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pgolf.artifact.container import read_artifact, unpack_artifact
from pgolf.artifact.int8 import SCALE_SUFFIX
from pgolf.artifact.load import dequantize_artifact
from pgolf.config import config_from_dict, load_preset
from pgolf.errors import PgolfError
from pgolf.model.gpt import GPT
from pgolf.quant.config import QuantConfig
from pgolf.quant.fit import BYTES_CAP, default_target_bytes, fit_to_budget
from pgolf.quant.hessian import collect_hessians
from pgolf.quant.pipeline import hessian_names, quantize_and_pack
from pgolf.quant.policy import plan_tensors
from pgolf.quant.quantize import parameter_roles, quantize_model


def small_model(**changes) -> GPT:
    """2 layers × 64 (the baseline's ModelConfig with `changes`), random 2-D weights: every
    matrix is below 65,536 elements, so tests lower the fp16 limit."""
    cfg = load_preset("baseline").model
    cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads = 2, 64, 4, 2
    cfg.vocab_size = 128
    for name, value in changes.items():
        setattr(cfg, name, value)
    torch.manual_seed(0)
    model = GPT(cfg)
    for p in model.parameters():
        if p.ndim == 2:
            nn.init.normal_(p, std=0.05)
    return model


def quant_cfg(**kw) -> QuantConfig:
    cfg = QuantConfig(codec="mixed", keep_float_max_numel=1024, calib_batches=2)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def model_and_hessians():
    model = small_model()
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(1))
    return model, collect_hessians(model, [ids], hessian_names(model, quant_cfg()))


def test_plan_follows_roles_sizes_and_overrides():
    model = small_model()
    state = model.state_dict()
    roles = {n: "matrix" for n in state} | {"tok_emb.weight": "embedding"}
    for n, p in model.named_parameters():
        if p.ndim != 2:
            roles[n] = "scalar"
    cfg = quant_cfg(
        mlp_bits=5,
        embed_bits=7,
        quant_overrides="blocks.1.attn.c_k.weight=fp16,blocks.0.attn.*=int8-gptq",
    )
    plans = plan_tensors(state, roles, cfg)
    assert plans["tok_emb.weight"].bits == 7 and plans["tok_emb.weight"].qclass == "embed"
    assert plans["tok_emb.weight"].clip.sigmas == cfg.embed_clip_sigmas
    assert plans["blocks.0.mlp.fc.weight"].bits == 5
    assert plans["blocks.1.attn.c_q.weight"].bits == 6 and plans["blocks.1.attn.c_q.weight"].gptq
    assert plans["blocks.1.attn.c_k.weight"].scheme == "float16"
    assert (
        plans["blocks.0.attn.c_q.weight"].bits == 8 and not plans["blocks.0.attn.c_q.weight"].gptq
    )
    assert plans["blocks.0.attn_scale"].scheme == "float16"  # small: fp16 before any role rule
    big = plan_tensors(state, roles, quant_cfg(keep_float_max_numel=65536))
    assert all(p.scheme != "int" for p in big.values())  # the record's ≤ 65,536 → fp16 rule
    cfg = quant_cfg(attn_clip_sigmas=13.0, mlp_clip_sigmas=12.0)
    plans = plan_tensors(state, roles, cfg)
    assert plans["blocks.0.attn.c_q.weight"].clip.sigmas == 13.0
    assert plans["blocks.0.mlp.proj.weight"].clip.sigmas == 12.0
    with pytest.raises(PgolfError, match="quant_overrides"):
        plan_tensors(state, roles, quant_cfg(quant_overrides="x=int4"))
    with pytest.raises(PgolfError, match="bits 9"):
        plan_tensors(state, roles, quant_cfg(matrix_bits=9))


def test_quant_config_fields_are_flat_and_settable_by_env_names():
    from pgolf.config import resolve_config

    cfg = resolve_config(
        "baseline",
        ["quant.codec=mixed", "quant.gptq_order=asc"],
        environ={"MATRIX_CLIP_SIGMAS": "11.5", "EMBED_BITS": "7", "GPTQ_RESERVE_SECONDS": "8"},
    )
    assert cfg.quant.matrix_clip_sigmas == 11.5 and cfg.quant.embed_bits == 7
    assert cfg.train.gptq_reserve_seconds == 8.0 and cfg.quant.gptq_order == "asc"
    assert config_from_dict(cfg.to_dict()).quant == cfg.quant


def test_quantized_model_round_trips_through_the_artifact(tmp_path, model_and_hessians):
    model, hessians = model_and_hessians
    cfg = quant_cfg()
    path = tmp_path / "artifact.pgolf"
    report = quantize_and_pack(model, cfg, hessians, (50_000, "test"), path=path)
    assert report["bytes_model"] == path.stat().st_size
    assert report["bytes_total"] == report["bytes_model"] + 50_000
    arrays, meta = read_artifact(path)
    state = dequantize_artifact(arrays, meta)
    fresh = GPT(model.cfg)
    fresh.load_state_dict(state, strict=True)
    for name, entry in meta["tensors"].items():
        if entry["scheme"] == "int":
            q = torch.from_numpy(arrays[name]).double()
            s = torch.from_numpy(arrays[name + SCALE_SUFFIX]).double()
            assert torch.equal(state[name].double(), q * s[:, None])  # exact dequantisation
            assert int(q.abs().max()) <= (1 << (entry["bits"] - 1)) - 1
    # Every GPTQ matrix had a Hessian, nothing fell back; the report explains the bytes.
    assert report["gptq_fallbacks"] == {}
    assert {"embed", "attn", "mlp"} <= set(report["bytes_per_class"])
    assert sum(report["bytes_per_class"].values()) <= report["bytes_model"]
    assert report["int_values_bytes"] >= report["int_values_entropy_bytes"]
    x = torch.randint(0, 128, (1, 32))
    with torch.no_grad():
        assert (fresh(x) - model(x)).abs().max() < 1.0


def test_missing_hessian_is_reported_as_a_fallback(model_and_hessians):
    model, hessians = model_and_hessians
    partial = {k: v for k, v in hessians.items() if "mlp" not in k}
    qm = quantize_model(model, quant_cfg(), partial)
    fallbacks = {n for n, st in qm.stats.items() if st.get("fallback")}
    assert fallbacks == {n for n in qm.stats if ".mlp." in n}


@pytest.mark.parametrize("mode", ["pm1", "magnitude"])
def test_fitter_lands_just_under_an_arbitrary_target(model_and_hessians, mode):
    model, hessians = model_and_hessians
    qm = quantize_model(model, quant_cfg(), hessians)
    free, _ = fit_to_budget(qm, 10**9)
    target = len(free.data) - 1500
    qm = quantize_model(model, quant_cfg(), hessians)
    packed, info = fit_to_budget(qm, target, prune=mode, hessians=hessians)
    assert target - 1500 < len(packed.data) <= target
    assert info["pruned"]["count"] > 0 and info["pruned"]["mode"] == mode
    arrays, _ = unpack_artifact(packed.data)
    assert all((arrays[n] == qm.arrays[n]).all() for n in qm.arrays)


def test_unreachable_target_is_a_one_line_error(model_and_hessians):
    model, hessians = model_and_hessians
    qm = quantize_model(model, quant_cfg(), hessians)
    with pytest.raises(PgolfError, match="quant.target_bytes=1,000: cannot fit"):
        fit_to_budget(qm, 1000, hessians=hessians)
    with pytest.raises(PgolfError, match="fit_prune=none"):
        fit_to_budget(qm, 1000, prune="none")


def test_budget_is_decimal_bytes_not_mebibytes():
    # S1019 budgeted TARGET_MB × 1024² (SPEC §1.2); the cap is 16,000,000 decimal bytes.
    assert BYTES_CAP == 16_000_000 != 16 * 1024**2
    assert default_target_bytes(100_000) == 15_900_000
    cfg = QuantConfig()
    assert cfg.target_bytes == 0  # 0 means BYTES_CAP − code bytes, computed at quantize time


def test_lookup_tables_other_than_the_token_embedding_are_plain_int8_rows():
    """BigramHash / value-embedding tables share the embedding role (token Adam) but have no
    linear input: no Hessian, no GPTQ, int8 per-row (SPEC §9.1), whatever embed_bits says."""
    cfg = load_preset("pr414")
    cfg.model.num_layers, cfg.model.model_dim, cfg.model.num_heads = 4, 128, 2
    with torch.device("meta"):
        model = GPT(cfg.model)
    state = {n: torch.empty(p.shape) for n, p in model.state_dict().items()}
    plans = plan_tensors(state, parameter_roles(model), quant_cfg(embed_bits=7))
    assert plans["tok_emb.weight"].qclass == "embed" and plans["tok_emb.weight"].gptq
    for name in ("bigram.embed.weight", "ve_shared.embed.weight"):
        plan = plans[name]
        assert (plan.qclass, plan.bits, plan.gptq, plan.clip.method) == (
            "table",
            8,
            False,
            "percentile",
        ), name
