"""Speed of the pre-flight shard check (`pgolf.data.shards.check_token_ids`), in seconds per GB.

Writes N synthetic shards of 100M ids (the official shard size, 200 MB each) into a temporary
folder, checks each against a 1024-id vocabulary twice: "cold" after asking the kernel to drop
the files from its page cache (posix_fadvise DONTNEED; a VM's host may still cache them), then
"warm". Prints one JSON line and deletes the shards.

    python benchmarks/shard_check.py [--shards 3] [--tokens 100000000] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pgolf.data.shards import check_token_ids, shard_name, write_shard

VOCAB = 1024


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def check_all(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        check_token_ids(path, VOCAB, f"a vocabulary of {VOCAB}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=100_000_000)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=args.tokens, dtype=np.uint16)
    folder = Path(tempfile.mkdtemp(prefix="pgolf-shard-check-", dir=args.dir))
    try:
        paths = [folder / shard_name("train", i) for i in range(args.shards)]
        for path in paths:
            write_shard(path, tokens)
        gb = sum(p.stat().st_size for p in paths) / 1e9
        for path in paths:
            drop_from_page_cache(path)
        cold_s = check_all(paths)
        warm_s = check_all(paths)
    finally:
        shutil.rmtree(folder)
    print(
        json.dumps(
            {
                "shards": args.shards,
                "tokens_per_shard": args.tokens,
                "gb": round(gb, 3),
                "cold_s": round(cold_s, 3),
                "cold_s_per_gb": round(cold_s / gb, 3),
                "warm_s": round(warm_s, 3),
                "warm_s_per_gb": round(warm_s / gb, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
