"""Optional metric sinks behind extras: everything RunLog writes to metrics.jsonl is also forwarded.

metrics.jsonl stays the source of truth; a sink is a live view (TensorBoard, Weights & Biases) and
is never required. The libraries are imported only when a sink is asked for, so a plain install
never needs them, and a missing extra is a one-line PgolfError naming the pip command.
Only rank 0 opens sinks (RunLog is disabled on other ranks), so a torchrun run logs once.
"""

from __future__ import annotations

import atexit
import importlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from pgolf import rundir
from pgolf.errors import PgolfError

SINKS = ("tensorboard", "wandb")
# Keys that identify a record rather than measure something; never plotted as scalars.
_NON_SCALARS = {"step", "time", "eval_mode"}


class MetricSink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> tuple[int | None, dict[str, float]]:
    """(step, {tag: value}) of one metrics record: train/… for steps, eval/MODE/… for evals."""
    prefix = f"eval/{record['eval_mode']}" if "eval_mode" in record else "train"
    values = {
        f"{prefix}/{k}": float(v)
        for k, v in record.items()
        if k not in _NON_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    step = record.get("step")
    return (int(step) if isinstance(step, (int, float)) else None), values


def _require(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise PgolfError(
            f"--log {extra} needs the optional package {extra!r}, which is not installed: "
            f'pip install "pgolf[{extra}]"'
        ) from None


_MODULES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb",)}


def require_sinks(names: Iterable[str] | None) -> None:
    """Fail before any work (and before a run directory exists) if a requested extra is absent."""
    for name in names or ():
        if name not in _MODULES:
            raise PgolfError(f"unknown --log {name!r}; available: {', '.join(SINKS)}")
        for module in _MODULES[name]:
            _require(module, name)


class TensorBoardSink:
    def __init__(self, run_dir: Path):
        _require("tensorboard", "tensorboard")  # torch's wrapper may import without it
        tb = _require("torch.utils.tensorboard", "tensorboard")
        self.writer = tb.SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.last_step = 0

    def log(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        # Final evals carry no step; they belong at the end of training.
        self.last_step = step if step is not None else self.last_step
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, self.last_step)
        self.writer.flush()  # a crash or kill must not lose the curve

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: Path):
        self.wandb = _require("wandb", "wandb")
        config_path = Path(run_dir) / rundir.CONFIG
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.run = self.wandb.init(name=Path(run_dir).name, dir=str(run_dir), config=config)
        self.last_step = 0

    def log(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        # W&B refuses steps that go backwards, so step-less evals reuse the last step.
        self.last_step = max(self.last_step, step) if step is not None else self.last_step
        self.run.log(values, step=self.last_step)

    def close(self) -> None:
        self.run.finish()


_FACTORIES = {"tensorboard": TensorBoardSink, "wandb": WandbSink}
# One sink per (kind, run): the train and eval stages of one `pgolf run` each open a RunLog, and
# they must write to the same TensorBoard directory / W&B run, not start a second one.
_OPEN: dict[tuple[str, str], MetricSink] = {}


def open_sinks(names: Iterable[str] | None, run_dir: Path) -> list[MetricSink]:
    sinks = []
    require_sinks(names)
    for name in names or ():
        key = (name, str(Path(run_dir).resolve()))
        if key not in _OPEN:
            _OPEN[key] = _FACTORIES[name](Path(run_dir))
        sinks.append(_OPEN[key])
    return sinks


# No caller by name: it runs at interpreter exit, so every open sink is flushed and closed once,
# whichever stage (or exception) ended the process.
@atexit.register
def close_all() -> None:
    while _OPEN:
        _, sink = _OPEN.popitem()
        sink.close()
