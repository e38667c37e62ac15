"""Resumable training checkpoints.

A checkpoint holds everything that decides the rest of the run: weights, every optimizer's state,
the loader position, the step and the counted training time. It is written atomically and read
with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers, so
loading one never executes code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pgolf.errors import PgolfError
from pgolf.fileio import atomic_write

CHECKPOINT_NAME = "state.pt"


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    path = Path(directory) / CHECKPOINT_NAME
    with atomic_write(path) as f:
        torch.save(state, f)
    return path


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CHECKPOINT_NAME
    if not path.is_file():
        raise PgolfError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and why
        raise PgolfError(f"{path}: unreadable checkpoint ({exc})") from None
