"""What every command shares: printing a result (`--json` or a human table) and common flags.

Its own module, not the package's `__init__`, so that the command modules can import it while
`pgolf.cli` imports them.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def print_result(result: dict[str, Any], as_json: bool, human: str) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(human)


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def add_allow_tokenizer_mismatch(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-tokenizer-mismatch",
        action="store_true",
        help="use a tokenizer other than the one the shards' meta.json records, or a "
        "model.vocab_size other than its vocabulary, on purpose",
    )
