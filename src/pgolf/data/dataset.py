"""Resolve a run's data settings to shard lists and a tokenizer, and check they fit the model."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from pgolf.data.config import DataConfig
from pgolf.data.shards import check_token_ids, find_shards, read_header
from pgolf.data.tokenizer import file_sha256, load_tokenizer
from pgolf.errors import PgolfError

META_FILE = "meta.json"
MISMATCH_HINT = (
    "pass --allow-tokenizer-mismatch (setting data.allow_tokenizer_mismatch=true) to use it "
    "on purpose"
)


@dataclass(frozen=True)
class DatasetFiles:
    train: list[Path]
    val: list[Path]
    tokenizer: Path

    def as_record(self) -> dict:
        """Resolved paths, as report.json's `data_files` keeps them for the audit's data
        separation rule: training reads only `train`."""
        return {
            "train": [str(Path(p).resolve()) for p in self.train],
            "val": [str(Path(p).resolve()) for p in self.val],
            "tokenizer": str(Path(self.tokenizer).resolve()),
        }


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


def check_tokenizer_recorded(tokenizer: Path, shards: Iterable[Path]) -> None:
    """Refuse a tokenizer other than the one the shards' meta.json records (by sha256).

    Directories without a meta.json that records one (e.g. fetched by upstream's script) pass:
    there only the token-id check can catch a wrong tokenizer.
    """
    digest = None
    for folder in sorted({Path(p).parent for p in shards}):
        meta_path = folder / META_FILE
        try:
            recorded = json.loads(meta_path.read_text(encoding="utf-8"))["tokenizer"]["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        digest = digest or file_sha256(tokenizer)
        if recorded != digest:
            raise PgolfError(
                f"{tokenizer}: not the tokenizer the shards in {folder} were made with "
                f"({meta_path} records sha256 {str(recorded)[:12]}…, this is {digest[:12]}…); "
                f"{MISMATCH_HINT}"
            )


def check_dataset(
    files: DatasetFiles,
    data: DataConfig,
    model_vocab: int,
    splits: Iterable[str] = ("train", "val"),
) -> spm.SentencePieceProcessor:
    """Check tokenizer, model vocabulary and every shard of `splits` before any work starts.

    The tokenizer must be the one meta.json records and have exactly `model_vocab` pieces
    (unless data.allow_tokenizer_mismatch); every token id must be below the model's vocabulary
    in any case, or the embedding lookup fails mid-run. Returns the loaded tokenizer.
    """
    sp = load_tokenizer(files.tokenizer)
    shards = [p for split in splits for p in getattr(files, split)]
    tok_vocab = int(sp.vocab_size())
    if not data.allow_tokenizer_mismatch:
        check_tokenizer_recorded(files.tokenizer, shards)
        if tok_vocab != model_vocab:
            raise PgolfError(
                f"model.vocab_size={model_vocab} but the tokenizer {files.tokenizer} has "
                f"{tok_vocab} pieces; set model.vocab_size={tok_vocab}, or {MISMATCH_HINT}"
            )
    limit_name = f"model.vocab_size={model_vocab} (tokenizer {files.tokenizer}: {tok_vocab} pieces)"
    for path in shards:
        check_token_ids(path, model_vocab, limit_name)
    return sp
