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
from pgolf.fileio import write_text_atomic
from pgolf.rundir import METRICS, TRAIN_LOG

if TYPE_CHECKING:
    from pgolf.observe.sinks import MetricSink


def package_source_files() -> list[Path]:
    """Every source file of the running pgolf package, sorted: the code hash covers this fixed
    set, so `pgolf run` and `pgolf train` on the same code agree whatever each one imported."""
    init = Path(pgolf.__file__).resolve()
    if init.name != "__init__.py":  # an exported train_gpt.py: every module is the script
        return [init]
    return sorted(init.parent.rglob("*.py"))


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

    def text(self, message: str, echo: bool = True) -> None:
        """Append to train.log; also to stderr unless the log is quiet or `echo` is False."""
        if not self.enabled:
            return
        with open(self.run_dir / TRAIN_LOG, "a", encoding="utf-8") as f:
            f.write(message + "\n")
        if self.echo and echo:
            print(message, file=sys.stderr, flush=True)

    def metrics(self, **record: Any) -> None:
        if not self.enabled:
            return
        record.setdefault("time", round(time.time(), 3))
        with open(self.run_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.log(record)

    def drop_metrics_after(self, step: int) -> None:
        """Forget records of steps past `step` (a resumed run trains them again), so each step
        has one record and a plot of the resumed run has no zig-zag."""
        path = self.run_dir / METRICS
        if not self.enabled or not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _kept_on_resume(line, step)]
        if len(kept) < len(lines):
            write_text_atomic(path, "".join(kept))

    def header(self, config: dict[str, Any], device: str, world_size: int) -> None:
        files = package_source_files()
        self.text(
            f"pgolf {pgolf.__version__} | torch {torch.__version__} | "
            f"python {sys.version.split()[0]}"
        )
        self.text(f"host {platform.node()} | device {device} | world_size {world_size}")
        self.text(
            f"code_sha256 {code_sha256(files)} ({len(files)} files, {code_bytes(files)} bytes)"
        )
        # The whole config is one long line: train.log keeps it, the terminal gets a pointer.
        self.text("config " + json.dumps(config, sort_keys=True), echo=False)
        if self.echo:
            print(
                f"config: preset {config.get('preset')}, resolved in {self.run_dir}/config.json",
                file=sys.stderr,
                flush=True,
            )


def _kept_on_resume(line: str, step: int) -> bool:
    """Records up to `step` and those without one (final scores); not a torn last line."""
    try:
        return json.loads(line).get("step", -1) <= step
    except (json.JSONDecodeError, AttributeError):
        return False
