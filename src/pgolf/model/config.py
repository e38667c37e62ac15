"""Model settings: every architecture technique is a switch here (SPEC §4, §5)."""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.config_fields import env_field


@dataclass
class ModelConfig:
    vocab_size: int = env_field("VOCAB_SIZE", 1024)
    num_layers: int = env_field("NUM_LAYERS", 9)
    model_dim: int = env_field("MODEL_DIM", 512)
    num_heads: int = env_field("NUM_HEADS", 8)
    num_kv_heads: int = env_field("NUM_KV_HEADS", 4)
    mlp_mult: float = env_field("MLP_MULT", 2.0)
    tie_embeddings: bool = env_field("TIE_EMBEDDINGS", True)
    rope_base: float = env_field("ROPE_BASE", 10000.0)
    logit_softcap: float = env_field("LOGIT_SOFTCAP", 30.0)
    qk_gain_init: float = env_field("QK_GAIN_INIT", 1.5)
    tied_embed_init_std: float = env_field("TIED_EMBED_INIT_STD", 0.005)
