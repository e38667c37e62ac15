"""TOP's quantizer (SPEC §5.19, §5.31) against pgolf's: int6 GPTQ matrices, the int7 embedding, the
int8-per-row attention gate and the LQER correction of the three worst matrices.

These tests execute only the definitions they need from TOP's file (its quantiser, the gate and
LQER packers, `gptq_mixed_quantize`, `dequantize_mixed` and the `Hyperparameters` class read under
the record's environment) with its imports, through `load_definitions`; nothing of the math
changes, `log` becomes a no-op.
"""

from __future__ import annotations

import pytest
import torch

from pgolf.artifact.int8 import SCALE_SUFFIX
from pgolf.artifact.mixed import FACTOR_A, FACTOR_B, dequantize_mixed
from pgolf.quant.config import QuantConfig
from pgolf.quant.quantize import quantize_state
from tests.parity.official import assert_close, load_definitions

TOP_DEFINITIONS = (
    "Hyperparameters",
    "gptq_quantize_weight",
    "_quantize_gate_int8_row",
    "_lqer_pack",
    "_lqer_pack_asym",
    "gptq_mixed_quantize",
    "dequantize_mixed",
)
# TOP's run: int7 embedding, per-role SDClip 11.5 / 13 / 14, the int8 gate, LQER on (its default).
TOP_ENV = {
    "EMBED_BITS": "7",
    "MLP_CLIP_SIGMAS": "11.5",
    "ATTN_CLIP_SIGMAS": "13.0",
    "EMBED_CLIP_SIGMAS": "14.0",
    "GATED_ATTN_QUANT_GATE": "1",
}


def matrix(rows: int, cols: int, std: float, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * std


def hessian(cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5)
    x[:, :4] *= 8  # hot channels, as real activations have
    x[:, 7] = 0  # a dead input channel
    return x.T @ x / 1024


def top_state() -> tuple[dict, dict, dict]:
    """(state, roles, Hessians): four GPTQ matrices (> 65,536 elements) of different error norms,
    one with 260 columns (4 · 260 is no multiple of 64: symmetric factors), the gate, a scale."""
    state = {
        "tok_emb.weight": matrix(300, 256, 0.05, 1),
        "blocks.0.attn.c_q.weight": matrix(256, 260, 0.06, 2),
        "blocks.0.attn.attn_gate_w": matrix(8, 12, 0.3, 3),
        "blocks.0.mlp.fc.weight": matrix(288, 256, 0.04, 4),
        "blocks.0.mlp.proj.weight": matrix(256, 288, 0.01, 5),  # the smallest error: left out
        "blocks.0.attn_scale": torch.rand(256, generator=torch.Generator().manual_seed(6)),
    }
    roles = {n: "matrix" for n in state} | {"tok_emb.weight": "embedding"}
    roles |= {"blocks.0.attn.attn_gate_w": "scalar", "blocks.0.attn_scale": "scalar"}
    hessians = {
        n: hessian(t.shape[1], i) for i, (n, t) in enumerate(state.items()) if t.numel() > 65536
    }
    return state, roles, hessians


def pgolf_top_quant(asymmetric: bool) -> QuantConfig:
    return QuantConfig(
        codec="mixed",
        matrix_bits=6,
        embed_bits=7,
        matrix_clip_sigmas=12.85,
        mlp_clip_sigmas=11.5,
        attn_clip_sigmas=13.0,
        embed_clip_sigmas=14.0,
        quant_overrides="*.attn_gate_w=int8-gptq:rowmax",
        lqer=True,
        lqer_rank=4,
        lqer_top_k=3,
        lqer_asymmetric=asymmetric,
        lqer_asym_group=64,
        lqer_factor_bits=4,
    )


# TOP's result keys of factor (values, scales) per layout, and pgolf's array of each.
_FACTOR_KEYS = {
    "asym": ((".lqA_a", ".lqAs_a", FACTOR_A), (".lqB_a", ".lqBs_a", FACTOR_B)),
    "sym": ((".lqA", ".lqAs", FACTOR_A), (".lqB", ".lqBs", FACTOR_B)),
}


@pytest.mark.parametrize("asymmetric", [True, False])
def test_top_quant_with_lqer_matches_the_record_bit_for_bit(asymmetric):
    top = load_definitions("top", TOP_DEFINITIONS, **TOP_ENV, LQER_ASYM_ENABLED=int(asymmetric))
    h = top.args
    assert (h.lqer_enabled, h.lqer_rank, h.lqer_top_k, h.embed_bits) == (True, 4, 3, 7)
    state, roles, hessians = top_state()
    result, meta = top.gptq_mixed_quantize(state, hessians, h)
    theirs = top.dequantize_mixed(result, meta, state)
    qm = quantize_state(state, roles, pgolf_top_quant(asymmetric), hessians)
    ours = dequantize_mixed(qm.arrays, qm.meta)

    entries = qm.meta["tensors"]
    corrected = {n: e["lqer"]["layout"] for n, e in entries.items() if "lqer" in e}
    their_layouts = {n: m.split("+")[1] for n, m in meta.items() if "+lqer" in m}
    assert corrected == {n: "asym" if m == "lqer_asym" else "sym" for n, m in their_layouts.items()}
    assert "blocks.0.mlp.proj.weight" not in corrected and len(corrected) == 3
    assert corrected["blocks.0.attn.c_q.weight"] == "sym"  # 4 · 260 entries: no 64-groups
    for name, layout in corrected.items():
        for values, scales, ours_key in _FACTOR_KEYS[layout]:
            q = torch.from_numpy(qm.arrays[name + ours_key])
            s = torch.from_numpy(qm.arrays[name + ours_key + SCALE_SUFFIX])
            assert_close(f"{name} LQER {ours_key} integers", q, result[name + values])
            assert_close(
                f"{name} LQER {ours_key} scales", s.reshape(-1), result[name + scales].reshape(-1)
            )
    gate = "blocks.0.attn.attn_gate_w"
    assert meta[gate] == "gate_int8_row" and entries[gate]["bits"] == 8
    assert_close("int8 gate integers", torch.from_numpy(qm.arrays[gate]), result[gate + ".gq"])
    assert (
        meta["tok_emb.weight"].startswith("gptq (int7)") and entries["tok_emb.weight"]["bits"] == 7
    )
    for name, value in theirs.items():
        assert_close(f"TOP dequantised {name}", ours[name], value)
