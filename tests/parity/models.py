"""Each official script's GPT next to pgolf's, both shrunk to one tiny shape.

`pair(preset)` loads the preset's script through the shim with its Hyperparameters shrunk (4 layers
× 128, 4 heads, 2 KV heads or MHA where the preset is MHA, small bigram/VE tables) and returns the
module together with pgolf's ModelConfig shrunk the same way. Layer selections shrink
consistently: XSA "last n of 11" becomes "last 2 of 4" (all stays all), VE layers stay the last
two, S1413's loop 4..5 becomes 1..2. Bigram and VE widths stay ≥ 64 so that the orthogonal init
(which skips smaller matrices) reaches their projections.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.config import load_preset
from pgolf.model.config import ModelConfig
from pgolf.model.layout import resolve_layout
from pgolf.train.config import TrainConfig

from .official import PRESET_SCRIPT, load_official

# Values the record's run command set instead of the script's default (SPEC §5.14: "QK5").
RUN_COMMAND = {"s1413": {"QK_GAIN_INIT": "5.0"}}

# GPT keyword -> Hyperparameters attribute, where main() spells them differently.
ARG_ALIASES = {"dtg": "dtg_enabled", "neg_slope": "negative_slope", "use_vrl": "vrl"}


def shrunk_config(preset: str) -> ModelConfig:
    cfg = load_preset(preset).model
    mha = cfg.num_kv_heads == cfg.num_heads
    cfg.num_layers, cfg.model_dim, cfg.num_heads = 4, 128, 4
    cfg.num_kv_heads = 4 if mha else 2
    cfg.vocab_size = 1024
    if cfg.bigram_vocab_size:
        cfg.bigram_vocab_size, cfg.bigram_dim = 64, 64
    cfg.ve_dim = 96
    if cfg.xsa_last_n > 0:
        cfg.xsa_last_n = 2
    if cfg.num_loops:
        cfg.loop_start, cfg.loop_end = 1, 2
    return cfg


def script_env(cfg: ModelConfig, script: str) -> dict[str, str]:
    """The environment that gives the script's Hyperparameters the same shrunk shape."""
    layout = resolve_layout(cfg)
    env = {
        "VOCAB_SIZE": cfg.vocab_size,
        "NUM_LAYERS": cfg.num_layers,
        "MODEL_DIM": cfg.model_dim,
        "EMBEDDING_DIM": cfg.model_dim,
        "NUM_HEADS": cfg.num_heads,
        "NUM_KV_HEADS": cfg.num_kv_heads,
        "XSA_LAST_N": len(layout.xsa),
        "BIGRAM_VOCAB_SIZE": cfg.bigram_vocab_size,
        "BIGRAM_DIM": cfg.bigram_dim,
        "VE_DIM": cfg.ve_dim,
        "VE_LAYERS": ",".join(map(str, layout.ve)),
        "LOOP_START": cfg.loop_start,
        "LOOP_END": cfg.loop_end,
    }
    return {k: str(v) for k, v in env.items()} | RUN_COMMAND.get(script, {})


@functools.cache
def _script_module(preset: str) -> types.ModuleType:
    script = PRESET_SCRIPT[preset]
    return load_official(script, **script_env(shrunk_config(preset), script))


def pair(preset: str) -> tuple[types.ModuleType, ModelConfig]:
    """The shrunk script module (loaded once per preset: tests only call into it) and config."""
    return _script_module(preset), shrunk_config(preset)


def official_gpt(mod: types.ModuleType) -> nn.Module:
    """The script's GPT built from its Hyperparameters as its main() does."""
    params = inspect.signature(mod.GPT).parameters
    if list(params) == ["h"]:  # S1413 takes the Hyperparameters object itself
        return mod.GPT(mod.args)
    kwargs = {}
    for name in params:
        attr = ARG_ALIASES.get(name, name)
        if hasattr(mod.args, attr):
            kwargs[name] = getattr(mod.args, attr)
    return mod.GPT(**kwargs)


def official_state_dict(mod: types.ModuleType, model: nn.Module) -> dict[str, Tensor]:
    """The official state dict under pgolf's names: banked scripts unbank, as their export does."""
    sd = dict(model.state_dict())
    # P1004 divides its logits by a saved buffer that nothing ever sets from 1: the identity.
    temp = sd.pop("inference_temp", None)
    assert temp is None or temp.item() == 1.0, f"P1004 inference_temp = {temp}"
    if any("_bank" in k for k in sd):
        sd = mod._unbank_state_dict(sd, mod.args.num_layers)
    return sd


def to_upstream_precision(mod: types.ModuleType, model: nn.Module) -> nn.Module:
    """The dtypes main() leaves the model in: `.bfloat16()`, then fp32 back for the banks,
    CastedLinear weights and low-dim/control parameters (`restore_low_dim_params_to_fp32`)."""
    model.bfloat16()
    for name, p in model.named_parameters():
        if "_bank" in name:
            p.data = p.data.float()
    for m in model.modules():
        if isinstance(m, mod.CastedLinear):
            m.float()
    restore = getattr(mod, "restore_low_dim_params_to_fp32", None) or mod.restore_fp32_params
    restore(model)
    return model


def official_logits(mod: types.ModuleType, model: nn.Module, input_ids: Tensor) -> Tensor:
    """Soft-capped logits; the baseline has no `forward_logits`, so its loss call is tapped."""
    if hasattr(model, "forward_logits"):
        return model.forward_logits(input_ids)
    seen: list[Tensor] = []

    def tap(logits, targets, *args, **kwargs):
        seen.append(logits.detach())
        return F.cross_entropy(logits, targets, *args, **kwargs)

    real_f = mod.F
    mod.F = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    mod.F.cross_entropy = tap
    try:
        model(input_ids, torch.zeros_like(input_ids))
    finally:
        mod.F = real_f
    (logits,) = seen
    return logits.reshape(*input_ids.shape, -1)


# -- TOP (SPEC §5.31), which has no preset yet: its model at 8 layers × 128 ---------------------
# Eight layers keep the record's layout meaningful: layers 3..5 loop twice (the record's range)
# and the two lanes start at layer 6, after the loop, as the record's 8 (of 11) does. The values
# its run command set instead of the script's defaults: the sparse gate at scale 0.5 (SPEC §5.31)
# and the BOS-masked SmearGate; the Triton CE stays off (the CPU shim cannot launch it).
TOP_ENV = {
    "VOCAB_SIZE": "1024",
    "NUM_LAYERS": "8",
    "MODEL_DIM": "128",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "XSA_LAST_N": "8",
    "LOOP_START": "3",
    "LOOP_END": "5",
    "PARALLEL_START_LAYER": "6",
    "SPARSE_ATTN_GATE_ENABLED": "1",
    "SPARSE_ATTN_GATE_SCALE": "0.5",
    "SMEAR_GATE_ENABLED": "1",
    "FUSED_CE_ENABLED": "0",
    "BETA2": "0.99",  # SPEC §5.17: the run's Adam β2 (the script's default is 0.95)
}
# pgolf's names for the record's technique parameters (the rest are spelt alike once unbanked).
TOP_RENAMES = {"smear_gate.weight": "smear.gate_w", "smear_lambda": "smear.lam"}


def top_config() -> ModelConfig:
    """pgolf's switches for TOP's architecture at the shape of TOP_ENV."""
    return ModelConfig(
        vocab_size=1024,
        num_layers=8,
        model_dim=128,
        num_heads=4,
        num_kv_heads=2,
        mlp_mult=4.0,
        mlp_leaky_slope=0.5,
        rope_dims=16,
        qk_gain_init=5.0,
        xsa_last_n=-1,
        ln_scale=True,
        skip_gates=True,
        num_loops=2,
        loop_start=3,
        loop_end=5,
        enable_looping_at=0.35,
        parallel_residual_start=6,
        parallel_lanes=True,
        attn_out_gate=True,
        smear_gate="v2",
        orthogonal_init=True,
    )


def top_train_config() -> TrainConfig:
    """pgolf's optimizer settings for TOP's (SPEC §5.17; its script's defaults otherwise)."""
    return TrainConfig(
        matrix_lr=0.026,
        scalar_lr=0.02,
        tied_embed_lr=0.03,
        muon_momentum=0.97,
        muon_momentum_warmup_start=0.92,
        muon_momentum_warmup_steps=1500,
        muon_backend_steps=5,
        muon_row_normalize=True,
        muon_polar_express=True,
        muon_wd=0.095,
        embed_wd=0.085,
        adam_wd=0.02,
        beta1=0.9,
        beta2=0.99,
        adam_eps=1e-8,
        grad_clip_norm=0.3,
    )


@functools.cache
def top_module() -> types.ModuleType:
    """TOP's script loaded once (tests only call into it), with BOS = 1 as its loader sets it."""
    mod = load_official("top", **TOP_ENV)
    mod.BOS_ID = 1
    return mod


def top_state_dict(mod: types.ModuleType, model: nn.Module) -> dict[str, Tensor]:
    """TOP's state dict unbanked, under pgolf's names and shapes."""
    sd = mod._unbank_state_dict(model.state_dict(), mod.args.num_layers)
    out = {}
    for name, t in sd.items():
        if name.endswith(".attn.attn_gate_w"):
            name = name.replace(".attn_gate_w", ".gate_w")
        name = TOP_RENAMES.get(name, name)
        out[name] = t.reshape(()) if name == "smear.lam" else t
    return out
