"""Shared fixtures: the official files from $PGOLF_SHARED and a tiny dataset built from them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pgolf.config import RunConfig, load_preset
from pgolf.data.shards import read_shard, write_shard
from pgolf.settings import shared_data

OFFICIAL_TOKENIZER = shared_data("tokenizers", "fineweb_1024_bpe.model")
DEV_SHARD = shared_data("corpus", "fineweb_pg_sp1024_dev_shard", "fineweb_train_000000.bin")


@pytest.fixture(scope="session")
def official_tokenizer_path() -> Path:
    if not OFFICIAL_TOKENIZER.is_file():
        pytest.fail(f"{OFFICIAL_TOKENIZER} missing: set PGOLF_SHARED to the shared folder")
    return OFFICIAL_TOKENIZER


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, official_tokenizer_path) -> Path:
    """Official sp1024 tokens: 2 train shards and a 40,000-token val shard, plus the tokenizer."""
    tokens = np.asarray(read_shard(DEV_SHARD))
    out = tmp_path_factory.mktemp("tiny_dataset")
    write_shard(out / "fineweb_train_000000.bin", tokens[:200_000])
    write_shard(out / "fineweb_train_000001.bin", tokens[200_000:400_000])
    write_shard(out / "fineweb_val_000000.bin", tokens[-40_000:])
    shutil.copy(official_tokenizer_path, out / "tokenizer.model")
    return out


def tiny_config(data_dir: Path, **train_overrides) -> RunConfig:
    """A 2-layer × 64 baseline-architecture config that trains in about a second."""
    cfg = load_preset("baseline")
    cfg.data.path = str(data_dir)
    m, t = cfg.model, cfg.train
    m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads = 2, 64, 4, 2
    t.train_seq_len, t.train_batch_tokens, t.iterations = 64, 1024, 12
    t.warmdown_iters, t.warmup_steps, t.max_wallclock_seconds = 4, 0, 0.0
    t.train_log_every = 1
    cfg.eval.eval_seq_len, cfg.eval.val_batch_tokens, cfg.eval.max_val_tokens = 64, 4096, 4097
    for key, value in train_overrides.items():
        setattr(t, key, value)
    return cfg
