"""Progress bars for long work: shown on a terminal, silent in logs, CI and under `--json`."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def progress_bar(total: int | None = None, desc: str = "", enabled: bool = True, **kwargs) -> tqdm:
    quiet = os.environ.get("PGOLF_QUIET") == "1" or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled or quiet, leave=False, **kwargs)
