"""Shared fixtures: one torch thread, the official files from $PGOLF_SHARED, a tiny dataset,
and the set-up of a gloo rank for the two-process tests."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.config import RunConfig, load_preset
from pgolf.data.shards import read_shard, write_shard
from pgolf.settings import shared_data

OFFICIAL_TOKENIZER = shared_data("tokenizers", "fineweb_1024_bpe.model")
DEV_SHARD = shared_data("corpus", "fineweb_pg_sp1024_dev_shard", "fineweb_train_000000.bin")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    # The tests' matmuls are tiny: on a shared 2-core box two spinning OpenMP threads handing
    # work back and forth made them 3–35× slower than one thread. One thread also fixes how
    # float sums are split, which the bit-exact parity and golden tests rely on.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_cpu_world(rank: int, world_size: int, port: int):
    """Inside an `mp.spawn` worker: the torchrun environment of one CPU rank, then init_world()."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PGOLF_DEVICE="cpu",
    )
    torch.set_num_threads(1)
    from pgolf.dist import init_world

    return init_world()


@pytest.fixture(scope="session")
def official_tokenizer_path() -> Path:
    if not OFFICIAL_TOKENIZER.is_file():
        pytest.fail(f"{OFFICIAL_TOKENIZER} missing: set PGOLF_SHARED to the shared folder")
    return OFFICIAL_TOKENIZER


def make_tiny_dataset(out: Path) -> Path:
    """Official sp1024 tokens: 2 train shards and a 40,000-token val shard, plus the tokenizer."""
    tokens = np.asarray(read_shard(DEV_SHARD))
    write_shard(out / "fineweb_train_000000.bin", tokens[:200_000])
    write_shard(out / "fineweb_train_000001.bin", tokens[200_000:400_000])
    write_shard(out / "fineweb_val_000000.bin", tokens[-40_000:])
    shutil.copy(OFFICIAL_TOKENIZER, out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, official_tokenizer_path) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_dataset"))


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
