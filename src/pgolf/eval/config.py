"""Evaluation settings: window length and tiling, batch, coverage, budget, and score-first TTT.

Flat fields (the config tree sets bool/int/float/str per section); TTT settings carry a `ttt_`
prefix and the upstream environment names where the seed scripts have them (SPEC §5.29, §9).
Defaults keep the official baseline: non-overlapping windows, no TTT, temperature 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.config_fields import env_field
from pgolf.errors import PgolfError

EVAL_MODES = ("nonoverlapping", "sliding")
TTT_OPTIMIZERS = ("sgd", "adamw")
TTT_SCHEDULES = ("cosine", "double_cosine", "constant")
TTT_MODES = ("chunk", "lora")
TTT_DOC_ORDERS = ("stream", "length")
COMPILE_MODES = ("auto", "on", "off")


@dataclass
class EvalConfig:
    # -- windows (SPEC §3.5–3.6) --------------------------------------------------------------
    eval_seq_len: int = env_field("EVAL_SEQ_LEN", 0)  # 0 = train_seq_len; any length is legal
    val_batch_tokens: int = env_field("VAL_BATCH_SIZE", 524288)  # nonoverlapping, all ranks
    max_val_tokens: int = 0  # 0 = the whole validation stream (a cap marks the report partial)
    eval_mode: str = "nonoverlapping"  # or "sliding" (the corrected S1413 tiling)
    eval_stride: int = env_field("EVAL_STRIDE", 64)  # sliding only; context = T − stride
    eval_batch_windows: int = 32  # sliding windows per forward per rank (S1413 batch_seqs)
    per_document_reset: bool = False  # windows never read across a BOS (lm-eval style)
    per_document_sums: bool = False  # also report per-document sums (macro BPB)
    temperature: float = 1.0  # logits ÷ T; anything but 1 is flagged in the compliance record
    compile: str = "auto"  # torch.compile the scoring forward and TTT step; auto = CUDA only
    # -- eval budget (SPEC §1.3): everything after loading the artifact ------------------------
    eval_time_cap_s: float = 600.0  # 0 = no cap
    eval_time_cap_action: str = "warn"  # "warn" or "stop" (stop = partial coverage, flagged)
    # -- score-first TTT (SPEC §5.29) -----------------------------------------------------------
    ttt_enabled: bool = env_field("TTT_ENABLED", False)
    ttt_score_baseline: bool = False  # also score without TTT first → ttt.bpb_before
    ttt_lr: float = env_field("TTT_LR", 0.002)
    ttt_epochs: int = env_field("TTT_EPOCHS", 3)
    ttt_chunk_tokens: int = env_field("TTT_CHUNK_TOKENS", 32768)
    ttt_seq_len: int = 0  # training sequence length inside a chunk; 0 = the eval window length
    ttt_batch_seqs: int = env_field("TTT_BATCH_SEQS", 32)  # per rank per step; 0 = full batch
    ttt_grad_clip: float = env_field("TTT_GRAD_CLIP", 1.0)  # global norm; 0 = off
    ttt_optimizer: str = "sgd"  # "sgd" (every merged record) or "adamw" (P639 run, P1004)
    ttt_momentum: float = env_field("TTT_MOMENTUM", 0.9)  # SGD; the buffer persists across chunks
    ttt_beta1: float = 0.9  # AdamW (torch defaults, as P639/P1004)
    ttt_beta2: float = 0.999
    ttt_weight_decay: float = env_field("TTT_WD", 0.0)
    ttt_lr_schedule: str = "cosine"  # across chunks; "double_cosine" = × within-chunk cosine
    ttt_lr_floor: float = 0.1  # double_cosine: the within-chunk factor ends here
    ttt_block_lr_start: float = 1.0  # block 0's LR factor, rising linearly to 1.0 (1.0 = off)
    ttt_freeze_blocks: int = env_field("TTT_FREEZE_BLOCKS", 0)  # first k blocks frozen
    ttt_train_last_blocks: int = 0  # >0: only the last N blocks adapt (P1004's meaning)
    ttt_freeze_embeddings: bool = False  # every parameter whose role is "embedding"
    ttt_freeze_prefixes: str = ""  # comma-separated name prefixes, e.g. "tok_emb,bigram,ve_"
    ttt_also_train: str = ""  # comma-separated substrings that always adapt, e.g. "norm,scale"
    ttt_max_chunks: int = env_field("TTT_MAX_CHUNKS", 0)  # P610 only: score just M chunks
    ttt_train_chunks: int = env_field("TTT_MAX_TRAIN_CHUNKS", 0)  # P578: train first M, cosine/M
    ttt_ema_decay: float = 0.0  # P578: score with an EMA of the adapted weights (0 = off)
    ttt_snr_scaling: bool = env_field("EB_TTT", False)  # P639 EB-TTT gradient scaling
    ttt_snr_born: bool = env_field("EB_TTT_BORN", False)  # square the SNR ("Born rule")
    ttt_snr_clamp_min: float = 0.3
    ttt_snr_clamp_max: float = 3.0
    # -- per-document LoRA TTT and phased global SGD (SPEC §5.29 "Later refinements", §5.31) -----
    # "lora": each document scored chunk by chunk with its own adapters (`eval.lora_ttt`); the
    # global phases then train the model with the §5.29 fields above (ttt_lr, ttt_momentum,
    # ttt_chunk_tokens, ttt_batch_seqs, ttt_grad_clip, ttt_epochs, the freezes, ttt_seq_len).
    ttt_mode: str = "chunk"
    ttt_lora_rank: int = env_field("TTT_LORA_RANK", 96)
    ttt_lora_alpha: float = env_field("TTT_LORA_ALPHA", 144.0)  # output × alpha / rank
    ttt_lora_lr: float = env_field("TTT_LORA_LR", 1e-4)
    ttt_lora_targets: str = "q,k,v,o,mlp,head"  # TTT_K_LORA / TTT_O_LORA / TTT_MLP_LORA
    ttt_lora_chunk: int = env_field("TTT_CHUNK_SIZE", 48)  # targets per score-then-train step
    ttt_lora_context: int = 0  # window per chunk, inside its document; 0 = the eval window
    ttt_lora_batch_docs: int = env_field("TTT_BATCH_SIZE", 64)  # documents in lockstep
    ttt_lora_beta1: float = env_field("TTT_BETA1", 0.0)
    ttt_lora_beta2: float = env_field("TTT_BETA2", 0.999)
    ttt_lora_weight_decay: float = env_field("TTT_WEIGHT_DECAY", 1.0)
    ttt_lora_warm_start_a: bool = False  # TOP: A carries over between documents (only B resets)
    ttt_doc_order: str = "stream"  # or "length": TOP's longest batches first (see lora_ttt)
    ttt_phases: int = 0  # global SGD phases over the first ttt_prefix_docs documents; 0 = none
    ttt_prefix_docs: int = env_field("PHASED_TTT_PREFIX_DOCS", 2000)
    # -- pre-quant TTT on validation data (SPEC §5.30): ILLEGAL, research only ----------------
    prequant_ttt_enabled: bool = False  # refused unless the run allows illegal settings
    prequant_ttt_epochs: int = 10
    prequant_ttt_lr: float = 5e-4
    prequant_ttt_min_lr_frac: float = 0.1  # per-epoch cosine down to this fraction of the LR
    prequant_ttt_block_lr_start: float = 0.3
    prequant_ttt_freeze_blocks: int = 0
    prequant_ttt_batch_seqs: int = 32  # per rank per step
    prequant_ttt_grad_clip: float = 1.0


def validate_eval_config(cfg: EvalConfig) -> None:
    """Refuse impossible evaluation settings with a message naming the field."""
    checks = [
        (cfg.eval_mode in EVAL_MODES, f"eval.eval_mode must be one of {EVAL_MODES}"),
        (cfg.eval_seq_len >= 0, "eval.eval_seq_len must be ≥ 0 (0 = train_seq_len)"),
        (cfg.eval_stride >= 1, "eval.eval_stride must be ≥ 1"),
        (cfg.eval_batch_windows >= 1, "eval.eval_batch_windows must be ≥ 1"),
        (cfg.val_batch_tokens >= 1, "eval.val_batch_tokens must be ≥ 1"),
        (cfg.temperature > 0, "eval.temperature must be > 0"),
        (cfg.compile in COMPILE_MODES, f"eval.compile must be one of {COMPILE_MODES}"),
        (cfg.eval_time_cap_s >= 0, "eval.eval_time_cap_s must be ≥ 0 (0 = no cap)"),
        (cfg.eval_time_cap_action in ("warn", "stop"), "eval.eval_time_cap_action: warn|stop"),
        (cfg.ttt_chunk_tokens >= 1, "eval.ttt_chunk_tokens must be ≥ 1"),
        (cfg.ttt_epochs >= 0, "eval.ttt_epochs must be ≥ 0"),
        (cfg.ttt_seq_len >= 0, "eval.ttt_seq_len must be ≥ 0"),
        (cfg.ttt_batch_seqs >= 0, "eval.ttt_batch_seqs must be ≥ 0 (0 = full batch)"),
        (cfg.ttt_optimizer in TTT_OPTIMIZERS, f"eval.ttt_optimizer: one of {TTT_OPTIMIZERS}"),
        (cfg.ttt_lr_schedule in TTT_SCHEDULES, f"eval.ttt_lr_schedule: one of {TTT_SCHEDULES}"),
        (0.0 <= cfg.ttt_lr_floor <= 1.0, "eval.ttt_lr_floor must be in [0, 1]"),
        (0.0 <= cfg.ttt_ema_decay <= 1.0, "eval.ttt_ema_decay must be in [0, 1]"),
        (cfg.ttt_block_lr_start >= 0, "eval.ttt_block_lr_start must be ≥ 0"),
        (cfg.ttt_freeze_blocks >= 0, "eval.ttt_freeze_blocks must be ≥ 0"),
        (cfg.ttt_train_last_blocks >= 0, "eval.ttt_train_last_blocks must be ≥ 0"),
        (cfg.ttt_max_chunks >= 0, "eval.ttt_max_chunks must be ≥ 0"),
        (cfg.ttt_train_chunks >= 0, "eval.ttt_train_chunks must be ≥ 0"),
        (cfg.ttt_snr_clamp_min <= cfg.ttt_snr_clamp_max, "eval.ttt_snr_clamp_min > clamp_max"),
        (cfg.ttt_mode in TTT_MODES, f"eval.ttt_mode must be one of {TTT_MODES}"),
        (cfg.ttt_doc_order in TTT_DOC_ORDERS, f"eval.ttt_doc_order: one of {TTT_DOC_ORDERS}"),
        (cfg.ttt_lora_rank >= 1, "eval.ttt_lora_rank must be ≥ 1"),
        (cfg.ttt_lora_chunk >= 1, "eval.ttt_lora_chunk must be ≥ 1"),
        (cfg.ttt_lora_context >= 0, "eval.ttt_lora_context must be ≥ 0 (0 = eval window)"),
        (cfg.ttt_lora_batch_docs >= 1, "eval.ttt_lora_batch_docs must be ≥ 1"),
        (cfg.ttt_phases >= 0 and cfg.ttt_prefix_docs >= 0, "eval.ttt_phases/prefix_docs ≥ 0"),
        (
            cfg.ttt_mode != "lora" or cfg.ttt_max_chunks == cfg.ttt_train_chunks == 0,
            "eval.ttt_max_chunks / ttt_train_chunks apply to ttt_mode='chunk' only",
        ),
        (cfg.prequant_ttt_epochs >= 0, "eval.prequant_ttt_epochs must be ≥ 0"),
        (cfg.prequant_ttt_batch_seqs >= 1, "eval.prequant_ttt_batch_seqs must be ≥ 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise PgolfError(f"invalid config: {message}")
