"""The run directory: its file names, and reading and writing its JSON records.

RUN/config.json        resolved config (written first; every stage reads it)
RUN/train.log          human log, starting with versions, device and code hash
RUN/metrics.jsonl      one JSON object per logged step / evaluation
RUN/checkpoint/        resumable training state
RUN/model.safetensors  float weights after training
RUN/artifact.pgolf     the compressed submission weights
RUN/quant_report.json  the mixed quantizer's full report (its summary is report.json's `quant`)
RUN/report.json        the numbers: BPB, bytes, time split, compliance; `evaluations` holds the
                       scores `pgolf eval` took under other settings

Every stage and command reads the folder through this module, so none has to import the
pipeline (pgolf.run, which pulls in training) to read a JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pgolf.config import RunConfig, config_from_dict, validate_config
from pgolf.errors import PgolfError
from pgolf.fileio import write_text_atomic

CONFIG = "config.json"
TRAIN_LOG = "train.log"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint"
WEIGHTS = "model.safetensors"
ARTIFACT = "artifact.pgolf"
QUANT_REPORT = "quant_report.json"
REPORT = "report.json"
PERIODIC_EVAL = "periodic"  # metrics.jsonl's eval_mode of the in-training validation


def write_json(path: Path, record: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def load_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise PgolfError(f"{run_dir}: not a run directory (no {CONFIG})")
    try:
        cfg = config_from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise PgolfError(f"{path}: invalid JSON ({exc})") from None
    validate_config(cfg)
    return cfg


def read_report(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / REPORT
    return json.loads(path.read_text()) if path.is_file() else {}


def update_report(run_dir: Path, write: bool = True, **fields: Any) -> dict[str, Any]:
    """report.json with `fields` merged in; written (atomically) only where `write`, i.e. on the
    main rank, while every rank gets the merged report back."""
    report = {**read_report(run_dir), **fields}
    if write:
        write_json(Path(run_dir) / REPORT, report)
    return report


def finished_report(run_dir: Path) -> dict[str, Any] | None:
    """report.json of a run whose artifact has been scored, else None (not started, or cut
    short: a sweep runs it again)."""
    report = read_report(run_dir)
    return report if report.get("val_bpb") is not None else None


def load_evaluated(run_dir: Path) -> tuple[RunConfig, dict[str, Any]]:
    """The config and report of a run whose artifact has been scored, or a PgolfError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PgolfError(f"{run_dir}: run directory not found")
    cfg = load_config(run_dir)
    report = read_report(run_dir)
    if "val_bpb" not in report:
        raise PgolfError(f"{run_dir}: no evaluated {REPORT}; run `pgolf eval {run_dir}` first")
    return cfg, report


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records ([] before the first), less a torn last line: a run killed
    mid-write leaves one. A bad line before the last is corruption and an error."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise PgolfError(f"{path}:{number}: not a JSON object") from None
    return records
