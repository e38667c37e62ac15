"""Resolve a run's data settings to shard lists and a tokenizer, and check they fit the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pgolf.data.config import DataConfig
from pgolf.data.shards import find_shards, read_header
from pgolf.errors import PgolfError


@dataclass(frozen=True)
class DatasetFiles:
    train: list[Path]
    val: list[Path]
    tokenizer: Path


def resolve_dataset(data: DataConfig) -> DatasetFiles:
    if not data.path and not (data.train_glob and data.val_glob and data.tokenizer):
        raise PgolfError(
            "no dataset: pass --data DIR (or set data.path), or set data.train_glob, "
            "data.val_glob and data.tokenizer"
        )
    root = Path(data.path) if data.path else None
    if root is not None and not root.is_dir():
        raise PgolfError(f"{root}: dataset directory not found")
    train = find_shards(data.train_glob or root, split=None if data.train_glob else "train")
    val = find_shards(data.val_glob or root, split=None if data.val_glob else "val")
    tokenizer = Path(data.tokenizer) if data.tokenizer else root / "tokenizer.model"
    if not tokenizer.is_file():
        raise PgolfError(f"{tokenizer}: tokenizer model not found (set data.tokenizer)")
    for path in train + val:
        read_header(path)  # validate every shard before any work starts
    return DatasetFiles(train=train, val=val, tokenizer=tokenizer)
