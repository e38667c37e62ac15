"""What a shard, a glob of shards or a dataset directory holds, in the metric's own units.

Beyond files, tokens and documents (BOS count), with a tokenizer it reports the number of scored
targets and the official byte count behind them (SPEC §3.1–3.2): the denominator a BPB on this
data would use. Each split is one stream (shards concatenated in sorted order), as the evaluator
reads it: the first token is context only, every later token is a target.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pgolf.data.caseops import load_byte_sidecar, sidecar_path
from pgolf.data.dataset import check_tokenizer_recorded
from pgolf.data.shards import SPLITS, find_shards, read_shard
from pgolf.data.tokenizer import (
    BOS_ID,
    ByteTables,
    build_byte_tables,
    check_vocab_fits,
    file_sha256,
    load_tokenizer,
)
from pgolf.eval.bpb import target_bytes

# Tokens per step: bounds the int64 temporaries to ~0.5 GB however large the split.
CHUNK_TOKENS = 1 << 24
DATASET_TOKENIZER = "tokenizer.model"


def inspect_path(
    path: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    allow_tokenizer_mismatch: bool = False,
) -> dict:
    """Count files, tokens, documents and (with a tokenizer) targets and their official bytes.

    A dataset directory reports `train` and `val` separately and uses DIR/tokenizer.model when
    no tokenizer is given; a shard or a glob is one split called `shards`. A tokenizer other than
    the one the shards' meta.json records is refused unless `allow_tokenizer_mismatch`.
    """
    root = Path(path)
    if root.is_dir():
        kind = "dataset"
        shards = find_shards(root)
        # find_shards only returns fineweb_{split}_NNNNNN.bin names from a directory.
        splits = {name: [p for p in shards if p.name.split("_")[1] == name] for name in SPLITS}
        splits = {name: paths for name, paths in splits.items() if paths}
        if tokenizer is None and (root / DATASET_TOKENIZER).is_file():
            tokenizer = root / DATASET_TOKENIZER
    else:
        kind = "shards"
        splits = {"shards": find_shards(path)}

    tables, vocab, tok_info = None, None, None
    if tokenizer is not None:
        sp = load_tokenizer(tokenizer)
        if not allow_tokenizer_mismatch:
            check_tokenizer_recorded(Path(tokenizer), [p for ps in splits.values() for p in ps])
        vocab = int(sp.vocab_size())
        tables = build_byte_tables(sp)
        tok_info = {"path": str(tokenizer), "sha256": file_sha256(tokenizer), "vocab_size": vocab}
    return {
        "path": str(path),
        "kind": kind,
        "tokenizer": tok_info,
        "splits": {name: inspect_stream(paths, tables, vocab) for name, paths in splits.items()},
    }


def inspect_stream(
    paths: list[Path], tables: ByteTables | None = None, vocab_size: int | None = None
) -> dict:
    """Statistics of the stream formed by concatenating `paths` in order."""
    files = []
    tokens = documents = num_bytes = 0
    max_id = -1
    last = None  # the token before the current chunk: the context of its first target
    for path in paths:
        shard = read_shard(path)
        files.append({"path": str(path), "tokens": int(shard.size)})
        for start in range(0, shard.size, CHUNK_TOKENS):
            chunk = np.asarray(shard[start : start + CHUNK_TOKENS], dtype=np.int64)
            if vocab_size is not None:
                check_vocab_fits(chunk, vocab_size, str(path))
            tokens += chunk.size
            documents += int(np.count_nonzero(chunk == BOS_ID))
            max_id = max(max_id, int(chunk.max()))
            if tables is not None:
                prev = chunk[:-1] if last is None else np.concatenate(([last], chunk[:-1]))
                target = chunk[1:] if last is None else chunk
                num_bytes += int(target_bytes(prev, target, tables).sum(dtype=np.int64))
            last = int(chunk[-1])
    result = {
        "files": files,
        "tokens": tokens,
        "documents": documents,
        "max_token_id": max_id if tokens else None,
    }
    if tables is not None:
        targets = max(tokens - 1, 0)
        # CaseOps val shards count original bytes from their sidecars, as the evaluator does.
        sidecar = load_byte_sidecar(paths) if all(map(sidecar_path, paths)) else None
        if sidecar is not None:
            num_bytes = int(sidecar[1:].sum(dtype=np.int64))
        result["byte_source"] = "caseops sidecar" if sidecar is not None else "tokenizer tables"
        result["targets"] = targets
        result["target_bytes"] = num_bytes
        result["bytes_per_target"] = num_bytes / targets if targets else None
    return result


def format_inspect(result: dict) -> str:
    """A short human-readable report of `inspect_path`'s result."""
    lines = [f"{result['path']} ({result['kind']})"]
    tok = result.get("tokenizer")
    if tok:
        lines.append(
            f"tokenizer: {tok['path']} ({tok['vocab_size']} pieces, sha256 {tok['sha256'][:12]}…)"
        )
    else:
        lines.append("tokenizer: none given (pass one for targets and byte counts)")
    header = ["split", "files", "tokens", "documents", "max id"]
    if tok:
        header += ["targets", "bytes", "bytes/target"]
    rows = [header]
    for name, s in result["splits"].items():
        row = [name, f"{len(s['files']):,}", f"{s['tokens']:,}", f"{s['documents']:,}"]
        row.append("-" if s["max_token_id"] is None else str(s["max_token_id"]))
        if tok:
            per = s["bytes_per_target"]
            row += [
                f"{s['targets']:,}",
                f"{s['target_bytes']:,}",
                "-" if per is None else f"{per:.4f}",
            ]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)
