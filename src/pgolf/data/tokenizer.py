"""SentencePiece tokenizers: load, train with the official exporter settings, and the byte tables.

The byte tables (SPEC §3.1) are the single source of the byte count behind every BPB number in
pgolf: per token id, how many UTF-8 bytes its piece contributes, whether it carries a leading
space (`▁`), and whether it is a boundary (control/unknown/unused) token.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pgolf.data.shards import MAX_VOCAB
from pgolf.errors import PgolfError
from pgolf.fileio import write_bytes_atomic

SPACE_MARK = "\u2581"  # SentencePiece's "▁"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# SPEC §2.2: the settings of the official exporter (data/download_hf_docs_and_tokenize.py).
OFFICIAL_TRAINER_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=PAD_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    hard_vocab_limit=False,
)


def load_tokenizer(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"{path}: tokenizer model not found")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as exc:
        raise PgolfError(f"{path}: not a SentencePiece model ({exc})") from None
    if sp.vocab_size() > MAX_VOCAB:
        raise PgolfError(
            f"{path}: vocabulary of {sp.vocab_size()} exceeds {MAX_VOCAB} (ids are uint16)"
        )
    return sp


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clean_for_training(text: str) -> str:
    """The official exporter replaces NUL with a space and strips each document before training."""
    return text.replace("\x00", " ").strip()


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike, num_threads: int = 2
) -> spm.SentencePieceProcessor:
    """Train a BPE tokenizer with the official settings and write `out_path` atomically."""
    if not 260 <= vocab_size <= MAX_VOCAB:
        raise PgolfError(f"--vocab-size must lie in [260, {MAX_VOCAB}], got {vocab_size}")
    sentences = (t for t in map(clean_for_training, texts) if t)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=sentences,
            model_writer=model,
            vocab_size=vocab_size,
            num_threads=num_threads,
            # INFO logs one stderr line per byte piece and per 100 merges (~400 lines); keep
            # warnings such as "too long lines are skipped". Does not change the model bytes.
            minloglevel=1,
            **OFFICIAL_TRAINER_SETTINGS,
        )
    except RuntimeError as exc:
        raise PgolfError(f"tokenizer training failed: {exc}") from None
    write_bytes_atomic(out_path, model.getvalue())
    return load_tokenizer(out_path)


@dataclass(frozen=True)
class ByteTables:
    """Per-token-id byte accounting (SPEC §3.1). Index with token ids; length ≥ vocab size."""

    base_bytes: np.ndarray  # int16: UTF-8 bytes of the piece without its leading ▁
    has_leading_space: np.ndarray  # bool: piece starts with ▁
    is_boundary: np.ndarray  # bool: control / unknown / unused (no bytes, no space after it)

    @property
    def size(self) -> int:
        return int(self.base_bytes.shape[0])

    def sha256(self) -> str:
        """A digest of the three tables, dtype- and order-fixed.

        The run records it and the audit rebuilds the tables from the tokenizer file and compares:
        a silently different denominator is the classic BPB error (SPEC §3.4).
        """
        digest = hashlib.sha256()
        for name in ("base_bytes", "has_leading_space", "is_boundary"):
            array = np.ascontiguousarray(np.asarray(getattr(self, name)).astype("<i8"))
            digest.update(name.encode() + b"\0" + array.tobytes())
        return digest.hexdigest()


def build_byte_tables(sp: spm.SentencePieceProcessor, table_size: int | None = None) -> ByteTables:
    """Build the tables exactly as the records' `build_sentencepiece_luts`.

    `table_size` = max(tokenizer vocab, model vocab): ids past the tokenizer's vocab keep the
    defaults (0 bytes, boundary), so a model with a padded vocabulary is scored consistently.
    """
    vocab = sp.vocab_size()
    size = max(vocab, table_size or 0)
    base_bytes = np.zeros(size, dtype=np.int16)
    has_leading_space = np.zeros(size, dtype=bool)
    is_boundary = np.ones(size, dtype=bool)
    for i in range(vocab):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1  # a <0xNN> fallback piece stands for exactly one byte
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_MARK):
            has_leading_space[i] = True
            piece = piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    return ByteTables(base_bytes, has_leading_space, is_boundary)


def check_vocab_fits(tokens: np.ndarray, vocab_size: int, source: str) -> None:
    """Raise if any token id is outside the tokenizer's (or model's) vocabulary."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise PgolfError(
            f"{source}: token id {int(tokens.max())} does not fit a vocabulary of {vocab_size} "
            "(tokenizer and shards do not match)"
        )
