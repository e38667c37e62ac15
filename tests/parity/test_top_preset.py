"""The `top` preset against TOP's own settings (SPEC §5.31): every value pgolf can express.

The record's `Hyperparameters` are read under its run's environment (its script's defaults plus
the overrides SPEC quotes); each preset field is compared with the record's value of the same
setting. What the preset's header lists as a departure (GPTQ reserve, compressor, RoPE precision,
phased LoRA TTT) is left out here. At full size the preset has the record's layer order, lanes and
parameter count.
"""

from __future__ import annotations

import pytest
import torch

from pgolf.config import load_preset
from pgolf.model.gpt import GPT, count_parameters
from pgolf.model.layout import resolve_layout

from .official import load_definitions, load_official

# The run's overrides of the script's defaults (SPEC §5.17, §5.19, §5.22, §5.26, §5.29, §5.31).
RUN_ENV = {
    "SPARSE_ATTN_GATE_ENABLED": "1",
    "SPARSE_ATTN_GATE_SCALE": "0.5",
    "SMEAR_GATE_ENABLED": "1",
    "GATED_ATTN_QUANT_GATE": "1",
    "CASEOPS_ENABLED": "1",
    "EMBED_BITS": "7",
    "MLP_CLIP_SIGMAS": "11.5",
    "ATTN_CLIP_SIGMAS": "13.0",
    "EMBED_CLIP_SIGMAS": "14.0",
    "WARMDOWN_FRAC": "0.85",
    "MIN_LR": "0.10",
    "BETA2": "0.99",
    "PHASED_TTT_NUM_PHASES": "3",
    "PHASED_TTT_PREFIX_DOCS": "2500",
}


def _alike(section: str, names: str) -> list[tuple[str, str, str]]:
    """Settings that pgolf and the record spell alike."""
    return [(section, name, name) for name in names.split()]


# (preset section, pgolf field, the record's Hyperparameters attribute)
SAME_SETTINGS = [
    *_alike(
        "model",
        "vocab_size num_layers model_dim num_heads num_kv_heads mlp_mult tie_embeddings "
        "rope_base logit_softcap qk_gain_init tied_embed_init_std rope_dims "
        "rope_train_seq_len ln_scale num_loops enable_looping_at parallel_final_lane",
    ),
    ("model", "fused_softcap_ce", "fused_ce_enabled"),
    ("model", "skip_gates", "skip_gates_enabled"),
    ("model", "attn_out_gate", "sparse_attn_gate_enabled"),
    ("model", "attn_out_gate_window", "gate_window"),
    ("model", "smear_window", "gate_window"),
    *_alike(
        "train",
        "iterations warmdown_frac warmup_steps train_batch_tokens train_seq_len "
        "max_wallclock_seconds min_lr tied_embed_lr matrix_lr scalar_lr muon_momentum "
        "muon_backend_steps muon_momentum_warmup_start muon_momentum_warmup_steps "
        "muon_row_normalize beta1 beta2 adam_eps grad_clip_norm adam_wd muon_wd embed_wd "
        "val_loss_every",
    ),
    ("train", "ema_reference_decay", "ema_decay"),
    ("eval", "eval_seq_len", "eval_seq_len"),
    ("eval", "eval_seq_len", "ttt_eval_seq_len"),
    ("eval", "val_batch_tokens", "val_batch_tokens"),
    ("eval", "eval_stride", "eval_stride"),
    ("eval", "ttt_lr", "global_ttt_lr"),
    ("eval", "ttt_momentum", "global_ttt_momentum"),
    ("eval", "ttt_epochs", "global_ttt_epochs"),
    ("eval", "ttt_chunk_tokens", "global_ttt_chunk_tokens"),
    ("eval", "ttt_batch_seqs", "global_ttt_batch_seqs"),
    ("eval", "ttt_grad_clip", "global_ttt_grad_clip"),
    *_alike(
        "quant",
        "matrix_bits embed_bits matrix_clip_sigmas embed_clip_sigmas mlp_clip_sigmas "
        "attn_clip_sigmas lqer_rank lqer_top_k lqer_factor_bits lqer_asym_group",
    ),
    ("quant", "calib_batches", "gptq_calibration_batches"),
    ("quant", "lqer", "lqer_enabled"),
    ("quant", "lqer_asymmetric", "lqer_asym_enabled"),
]


@pytest.fixture(scope="module")
def record_args():
    return load_definitions("top", ("Hyperparameters",), **RUN_ENV).args


@pytest.mark.parametrize(("section", "field", "theirs"), SAME_SETTINGS)
def test_each_preset_value_is_the_records(record_args, section, field, theirs):
    ours = getattr(getattr(load_preset("top"), section), field)
    assert ours == getattr(record_args, theirs), f"{section}.{field} vs {theirs}"


def test_the_switches_without_a_counterpart_field_say_the_same(record_args):
    cfg = load_preset("top")
    h = record_args
    assert cfg.model.xsa_last_n == -1 and h.xsa_last_n == h.num_layers  # XSA on every layer
    assert cfg.model.smear_gate == "v2" and h.smear_gate_enabled  # the BOS-masked gate
    assert cfg.model.doc_masked_attention and h.caseops_enabled  # VarLen on CaseOps shards
    assert cfg.quant.quant_overrides.endswith("=int8-gptq:rowmax") and h.gated_attn_quant_gate
    assert cfg.train.muon_polar_express  # the record's only Newton–Schulz (SPEC §5.17)
    assert not h.rope_yarn and not h.attn_out_gate_enabled and not h.gated_attn_enabled


def test_at_full_size_the_preset_has_the_records_layout_and_parameter_count():
    mod = load_official("top", **RUN_ENV, FUSED_CE_ENABLED="0")
    cfg = load_preset("top").model
    with torch.device("meta"):
        ref = mod.GPT(mod.args)
        ours = GPT(cfg)
    layout = resolve_layout(cfg)
    assert layout.looped == (tuple(ref.encoder_indices), tuple(ref.decoder_indices))
    assert layout.parallel == tuple(range(ref.parallel_start_layer, ref.num_layers))
    assert count_parameters(ours) == sum(p.numel() for p in ref.parameters()) == 35_945_671
