"""What a run records so that it can be audited later: files opened, and byte-table hashes.

Kept tiny and dependency-free because `pgolf.run` imports it and the exported single-file
script therefore ships it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def byte_tables_sha256(tables) -> str:
    """A digest of the three per-token byte tables (SPEC §3.1), dtype- and order-fixed.

    The audit rebuilds the tables from the tokenizer file and compares digests: a silently
    different denominator is the classic BPB error (SPEC §3.4).
    """
    digest = hashlib.sha256()
    for name in ("base_bytes", "has_leading_space", "is_boundary"):
        array = np.ascontiguousarray(np.asarray(getattr(tables, name)).astype("<i8"))
        digest.update(name.encode() + b"\0" + array.tobytes())
    return digest.hexdigest()


def data_files_record(train: list[Path], val: list[Path], tokenizer: Path) -> dict:
    """Resolved paths of the shards a stage was handed: training reads only `train`."""
    return {
        "train": [str(Path(p).resolve()) for p in train],
        "val": [str(Path(p).resolve()) for p in val],
        "tokenizer": str(Path(tokenizer).resolve()),
    }
