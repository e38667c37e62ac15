"""The official token shard format (SPEC §2.3): read, validate, write.

A shard is a 1,024-byte header of 256 little-endian int32 (magic 20240520, version 1, token count,
then zeros) followed by that many little-endian uint16 token ids. Nothing else.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pgolf.errors import PgolfError
from pgolf.fileio import atomic_write

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
DEFAULT_SHARD_TOKENS = 100_000_000
MAX_VOCAB = 1 << 16
CHECK_CHUNK_TOKENS = 1 << 23  # 16 MiB of ids per step of check_token_ids
SPLITS = ("train", "val")
# CaseOps datasets add, per val shard, a same-format shard of per-token byte counts (SPEC §2.3).
BYTE_SIDECAR = "val_bytes"
_SHARD_NAME = re.compile(r"^fineweb_(train|val)_(\d{6})\.bin$")
_SIDECAR_NAME = re.compile(r"^fineweb_val_bytes_\d{6}\.bin$")


def shard_name(split: str, index: int) -> str:
    if split not in (*SPLITS, BYTE_SIDECAR):
        raise ValueError(f"split must be one of {(*SPLITS, BYTE_SIDECAR)}, got {split!r}")
    return f"fineweb_{split}_{index:06d}.bin"


def read_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"{path}: shard file not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise PgolfError(
            f"{path}: truncated shard: {size} bytes, expected at least a {HEADER_BYTES}-byte header"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise PgolfError(f"{path}: wrong magic {int(header[0])}, expected {SHARD_MAGIC}")
    if int(header[1]) != SHARD_VERSION:
        raise PgolfError(f"{path}: unsupported version {int(header[1])}, expected {SHARD_VERSION}")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        raise PgolfError(
            f"{path}: header says {num_tokens} tokens ({expected} bytes), file has {size} bytes"
        )
    return num_tokens


def read_shard(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Return the shard's tokens as a uint16 array (memory-mapped unless `mmap=False`)."""
    num_tokens = read_header(path)
    if mmap and num_tokens > 0:
        return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    return np.fromfile(path, dtype="<u2", count=num_tokens, offset=HEADER_BYTES)


def check_token_ids(path: str | os.PathLike, limit: int, limit_name: str) -> int:
    """Validate a shard's header and size and that every token id is below `limit`.

    Returns the token count. Reads the shard in chunks through a memory map and takes a vectorised
    max of each, so a 100M-token shard costs one sequential read. A bad id is reported with its
    token index and byte offset in the file; `limit_name` says where the limit comes from.
    """
    num_tokens = read_header(path)
    if num_tokens == 0 or limit >= MAX_VOCAB:
        return num_tokens  # every uint16 id fits
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    for start in range(0, num_tokens, CHECK_CHUNK_TOKENS):
        chunk = tokens[start : start + CHECK_CHUNK_TOKENS]
        if int(chunk.max()) >= limit:
            index = start + int(np.argmax(chunk >= limit))
            raise PgolfError(
                f"{path}: token id {int(tokens[index])} at token {index:,} (byte offset "
                f"{HEADER_BYTES + 2 * index:,}) is not below {limit_name}"
            )
    return num_tokens


def shard_bytes(tokens: np.ndarray) -> bytes:
    """Serialise tokens to the shard format in memory."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= MAX_VOCAB):
        raise PgolfError(f"token ids must lie in [0, {MAX_VOCAB}) to fit uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    return header.tobytes() + tokens.astype("<u2").tobytes()


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write one shard atomically (temp file + rename)."""
    data = shard_bytes(tokens)
    with atomic_write(path) as f:
        f.write(data)


class ShardWriter:
    """Streams token chunks of one split into numbered shards of at most `shard_tokens` tokens.

    A document may straddle two shards, as in the official exporter. Each shard is written
    atomically when it fills (or on `close`), so an interrupted build leaves only whole shards.
    """

    def __init__(
        self, out_dir: str | os.PathLike, split: str, shard_tokens: int = DEFAULT_SHARD_TOKENS
    ):
        if shard_tokens <= 0:
            raise PgolfError(f"shard size must be a positive number of tokens, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.shard_tokens = shard_tokens
        self.paths: list[Path] = []
        self.total_tokens = 0
        self._buffer = np.empty(shard_tokens, dtype="<u2")
        self._filled = 0

    def add(self, tokens: Iterable[int] | np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= MAX_VOCAB):
            raise PgolfError(f"token ids must lie in [0, {MAX_VOCAB}) to fit uint16")
        start = 0
        while start < tokens.size:
            take = min(self.shard_tokens - self._filled, tokens.size - start)
            self._buffer[self._filled : self._filled + take] = tokens[start : start + take]
            self._filled += take
            start += take
            if self._filled == self.shard_tokens:
                self._flush()
        self.total_tokens += int(tokens.size)

    def _flush(self) -> None:
        path = self.out_dir / shard_name(self.split, len(self.paths))
        write_shard(path, self._buffer[: self._filled])
        self.paths.append(path)
        self._filled = 0

    def close(self) -> list[Path]:
        if self._filled or not self.paths:
            self._flush()
        return self.paths


def find_shards(pattern: str | os.PathLike, split: str | None = None) -> list[Path]:
    """Resolve a shard file, a glob or a dataset directory (optionally one split) to paths."""
    text = str(pattern)
    path = Path(text)
    if path.is_dir():
        names = sorted(p for p in path.iterdir() if _SHARD_NAME.match(p.name))
        if split is not None:
            names = [p for p in names if _SHARD_NAME.match(p.name).group(1) == split]
        paths = names
    elif any(ch in text for ch in "*?["):
        # `fineweb_val_*.bin` also matches the byte sidecars, which are not token shards.
        paths = sorted(Path(p) for p in glob.glob(text) if not _SIDECAR_NAME.match(Path(p).name))
    else:
        paths = [path]
    if not paths:
        what = f"{split} shards" if split else "shards"
        raise PgolfError(f"{text}: no {what} found (expected fineweb_{{train,val}}_NNNNNN.bin)")
    for p in paths:
        if not p.is_file():
            raise PgolfError(f"{p}: shard file not found")
    return paths


def load_tokens(paths: Iterable[str | os.PathLike]) -> np.ndarray:
    """Concatenate shards in the given order into one in-memory uint16 array."""
    arrays = [np.asarray(read_shard(p)) for p in paths]
    return np.concatenate(arrays) if arrays else np.empty(0, dtype="<u2")
