"""Evaluation settings: window length, batch, coverage."""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.config_fields import env_field


@dataclass
class EvalConfig:
    eval_seq_len: int = env_field("EVAL_SEQ_LEN", 0)  # 0 = train_seq_len
    val_batch_tokens: int = env_field("VAL_BATCH_SIZE", 524288)
    max_val_tokens: int = 0  # 0 = the whole validation stream (a cap marks the report partial)
