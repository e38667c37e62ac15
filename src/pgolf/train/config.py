"""Training settings: optimizer, schedule, budget, averaging, QAT, loaders (SPEC §4.4–4.7, §5).

Every technique added on top of the baseline is a switch that defaults to off, so the baseline
preset trains exactly as the official script does. Fields that an upstream record script also
reads carry its environment name.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.config_fields import env_field

# The records' EMA (SPEC §5.5): decay 0.997, a window of 1/(1 − 0.997) ≈ 333 steps, in runs of
# ≈7,000 steps. A preset replaces both numbers with its own record's.
RECORD_EMA_DECAY = 0.997
RECORD_EMA_STEPS = 7000.0


@dataclass
class TrainConfig:
    seed: int = env_field("SEED", 1337)
    iterations: int = env_field("ITERATIONS", 20000)
    max_wallclock_seconds: float = env_field("MAX_WALLCLOCK_SECONDS", 600.0)  # 0 = no cap
    # Seconds kept free at the end of the cap for calibration that reads training data (GPTQ
    # Hessians count as training, SPEC §1.3): the loop stops at cap − reserve.
    gptq_reserve_seconds: float = env_field("GPTQ_RESERVE_SECONDS", 0.0)
    train_batch_tokens: int = env_field("TRAIN_BATCH_TOKENS", 524288)
    train_seq_len: int = env_field("TRAIN_SEQ_LEN", 1024)
    grad_accum_steps: int = 0  # 0 = upstream rule 8 // world_size
    warmdown_iters: int = env_field("WARMDOWN_ITERS", 1200)
    # > 0: the wall-clock-fraction warm-down of SPEC §5.26 replaces warmdown_iters.
    warmdown_frac: float = env_field("WARMDOWN_FRAC", 0.0)
    min_lr: float = env_field("MIN_LR", 0.0)  # floor of the warm-down's LR scale (TOP: 0.10)
    lr_warmup_steps: int = env_field("LR_WARMUP_STEPS", 0)  # linear LR warm-up; 0 = none (§4.5)
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
    muon_wd: float = env_field("MUON_WD", 0.0)  # decoupled: W ← W·(1 − lr·wd) (SPEC §5.17)
    muon_row_normalize: bool = env_field("MUON_ROW_NORMALIZE", False)  # MuonEq-R
    muon_polar_express: bool = env_field("MUON_POLAR_EXPRESS", False)  # per-step coefficients
    # The banked scripts (S549, S1019, S1060, P1351) keep Muon's gradient copy, momentum and
    # Newton–Schulz in bf16, the non-banked ones only Newton–Schulz (which pgolf runs in bf16 on
    # CUDA anyway): off | on | cuda (on with a GPU), as model.bf16_tables.
    muon_bf16_state: str = "off"
    beta1: float = env_field("BETA1", 0.9)
    beta2: float = env_field("BETA2", 0.95)
    adam_eps: float = env_field("ADAM_EPS", 1e-8)
    adam_wd: float = env_field("ADAM_WD", 0.0)  # AdamW decay of the scalar/control group
    embed_wd: float = env_field("EMBED_WD", 0.0)  # AdamW decay of the token embedding
    grad_clip_norm: float = env_field("GRAD_CLIP_NORM", 0.0)
    # Weight averaging (SPEC §5.5, §5.6). With both on, the final weights are
    # (1 − swa_weight)·EMA + swa_weight·SWA (P639's 50/50 blend).
    ema_enabled: bool = env_field("EMA_ENABLED", False)
    ema_decay: float = env_field("EMA_DECAY", 0.0)  # > 0 forces this absolute decay
    # Else the reference decay, exact in a run of the reference length, its window scaled with
    # the expected steps: 1 − d = (1 − ema_reference_decay) · ema_reference_steps / expected.
    ema_reference_decay: float = RECORD_EMA_DECAY
    ema_reference_steps: float = RECORD_EMA_STEPS
    ema_max_window_frac: float = 0.25  # warn when a fixed decay's window exceeds this share
    swa_enabled: bool = env_field("SWA_ENABLED", False)
    swa_every: int = env_field("SWA_EVERY", 50)
    # > 0: the interval is this share of the expected steps instead (P639's 50 of ≈7,000 ≈ 0.007),
    # so a run shrunk to a few hundred steps still takes a handful of snapshots.
    swa_every_frac: float = 0.0
    swa_start_frac: float = env_field("SWA_START_FRAC", 0.2)  # snapshot while LR scale < this
    swa_weight: float = 0.5
    # Quantisation-aware training with a straight-through estimator (SPEC §5.12).
    qat_enabled: bool = env_field("QAT_ENABLED", False)  # from the first step
    late_qat_threshold: float = env_field("LATE_QAT_THRESHOLD", 0.0)  # from LR scale < this
    qat_bits: int = env_field("QAT_BITS", 6)
    qat_clip_percentile: float = env_field("QAT_CLIP_PERCENTILE", 100.0)  # 100 = row max
    # Data order (SPEC §5.27): "sequential", "coprime" (S1060) or "shuffled" (S1394).
    train_loader: str = env_field("TRAIN_LOADER", "sequential")
    loader_seed: int = env_field("LOADER_SEED", 0)  # 0 = the records' own seeding
    compile: bool = env_field("COMPILE", True)  # only takes effect on CUDA
    checkpoint_every: int = 0  # steps between resumable checkpoints; 0 = by time only
    # Wall-clock seconds between resumable checkpoints (0 = off): a killed run loses at most this
    # much. The save pauses the training clock, as validation does.
    checkpoint_every_seconds: float = 300.0
