"""The run directory's human log (`train.log`) and machine log (`metrics.jsonl`), rank 0 only.

Every run log starts with what is needed to reproduce it: the resolved config, versions, device,
and a hash of the pgolf source that ran (the modded-nanogpt habit).
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import pgolf

if TYPE_CHECKING:
    from pgolf.observe.sinks import MetricSink


def imported_source_files() -> list[Path]:
    """The pgolf source files loaded in this process, sorted (what a submission would ship)."""
    files = set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if (name == "pgolf" or name.startswith("pgolf.")) and path and path.endswith(".py"):
            files.add(Path(path).resolve())
    return sorted(files)


def code_sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    root = Path(pgolf.__file__).resolve().parent
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def code_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)


class RunLog:
    def __init__(
        self, run_dir: Path, enabled: bool, echo: bool = True, sinks: Sequence[MetricSink] = ()
    ):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.echo = echo
        # Live views (TensorBoard, W&B) get every record after metrics.jsonl, the source of truth.
        self.sinks = list(sinks)
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def text(self, message: str) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "train.log", "a", encoding="utf-8") as f:
            f.write(message + "\n")
        if self.echo:
            print(message, file=sys.stderr, flush=True)

    def metrics(self, **record: Any) -> None:
        if not self.enabled:
            return
        record.setdefault("time", round(time.time(), 3))
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.log(record)

    def header(self, config: dict[str, Any], device: str, world_size: int) -> None:
        files = imported_source_files()
        self.text(
            f"pgolf {pgolf.__version__} | torch {torch.__version__} | "
            f"python {sys.version.split()[0]}"
        )
        self.text(f"host {platform.node()} | device {device} | world_size {world_size}")
        self.text(
            f"code_sha256 {code_sha256(files)} ({len(files)} files, {code_bytes(files)} bytes)"
        )
        self.text("config " + json.dumps(config, sort_keys=True))
