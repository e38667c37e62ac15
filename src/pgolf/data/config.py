"""Data settings of a run: where the shards and the tokenizer are."""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.config_fields import env_field


@dataclass
class DataConfig:
    path: str = env_field("DATA_PATH", "")  # dataset directory: shards (+ tokenizer.model)
    tokenizer: str = env_field("TOKENIZER_PATH", "")  # default: DIR/tokenizer.model
    train_glob: str = ""  # default: DIR/fineweb_train_*.bin
    val_glob: str = ""  # default: DIR/fineweb_val_*.bin
    # use a tokenizer other than the one the shards were made with, or a model.vocab_size other
    # than its vocabulary, on purpose (--allow-tokenizer-mismatch)
    allow_tokenizer_mismatch: bool = False
