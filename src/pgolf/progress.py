"""Progress bars for long work: shown on a terminal, silent in logs, CI and under `--json`.

tqdm is optional: the exported submission script embeds this module and must run where only
torch, numpy and sentencepiece are installed; without tqdm there is simply no bar.
"""

from __future__ import annotations

import os
import sys

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None


class NoBar:
    """What `progress_bar` gives without tqdm: what pgolf uses of a bar, doing nothing."""

    disable = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None = None, desc: str = "", enabled: bool = True, **kwargs):
    quiet = os.environ.get("PGOLF_QUIET") == "1" or not sys.stderr.isatty()
    if tqdm is None:
        return NoBar()
    return tqdm(total=total, desc=desc, disable=not enabled or quiet, leave=False, **kwargs)
