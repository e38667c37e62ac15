"""Which of upstream's CUDA precision behaviours a model reproduces (SPEC §4.3).

A setting is "off", "on", or "cuda": on exactly when `pgolf.dist` runs this process on CUDA, so
the record presets train on a GPU in the dtypes their scripts had, while CPU runs (CPU bf16 is
emulated and slow) stay fp32 unless a test or a user forces "on".
"""

from __future__ import annotations

from pgolf.dist import uses_cuda
from pgolf.errors import PgolfError

MODES = ("off", "cuda", "on")


def precision_on(mode: str, setting: str) -> bool:
    if mode not in MODES:
        raise PgolfError(f"{setting}={mode!r}: use one of {', '.join(MODES)}")
    return mode == "on" or (mode == "cuda" and uses_cuda())
