"""Training settings: optimizer, schedule, batch and budget (SPEC §4.4–4.7, §5)."""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.config_fields import env_field


@dataclass
class TrainConfig:
    seed: int = env_field("SEED", 1337)
    iterations: int = env_field("ITERATIONS", 20000)
    max_wallclock_seconds: float = env_field("MAX_WALLCLOCK_SECONDS", 600.0)  # 0 = no cap
    train_batch_tokens: int = env_field("TRAIN_BATCH_TOKENS", 524288)
    train_seq_len: int = env_field("TRAIN_SEQ_LEN", 1024)
    grad_accum_steps: int = 0  # 0 = upstream rule 8 // world_size
    warmdown_iters: int = env_field("WARMDOWN_ITERS", 1200)
    warmup_steps: int = env_field("WARMUP_STEPS", 20)  # compile warm-up, run then undone
    val_loss_every: int = env_field("VAL_LOSS_EVERY", 0)  # 0 = only at the end
    train_log_every: int = env_field("TRAIN_LOG_EVERY", 50)
    matrix_lr: float = env_field("MATRIX_LR", 0.04)
    scalar_lr: float = env_field("SCALAR_LR", 0.04)
    tied_embed_lr: float = env_field("TIED_EMBED_LR", 0.05)
    embed_lr: float = env_field("EMBED_LR", 0.6)
    head_lr: float = env_field("HEAD_LR", 0.008)
    muon_momentum: float = env_field("MUON_MOMENTUM", 0.95)
    muon_momentum_warmup_start: float = env_field("MUON_MOMENTUM_WARMUP_START", 0.85)
    muon_momentum_warmup_steps: int = env_field("MUON_MOMENTUM_WARMUP_STEPS", 500)
    muon_backend_steps: int = env_field("MUON_BACKEND_STEPS", 5)
    beta1: float = env_field("BETA1", 0.9)
    beta2: float = env_field("BETA2", 0.95)
    adam_eps: float = env_field("ADAM_EPS", 1e-8)
    grad_clip_norm: float = env_field("GRAD_CLIP_NORM", 0.0)
    compile: bool = env_field("COMPILE", True)  # only takes effect on CUDA
    checkpoint_every: int = 0  # steps between resumable checkpoints; 0 = end only
