"""What the observability commands read from a run directory: metrics records, report, bytes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgolf import rundir
from pgolf.errors import PgolfError


@dataclass
class RunRecords:
    path: Path
    steps: list[dict[str, Any]] = field(default_factory=list)  # training-step records
    evals: list[dict[str, Any]] = field(default_factory=list)  # records with an eval_mode
    val_curve: list[dict[str, Any]] = field(default_factory=list)  # train.val_loss_every scores
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def bpb_by_mode(self) -> dict[str, float]:
        """val_bpb per eval mode, the last record of each winning; report.json fills the gaps."""
        modes = {r["eval_mode"]: float(r["val_bpb"]) for r in self.evals if "val_bpb" in r}
        rep = self.report
        if "pre_quant" not in modes and rep.get("pre_quant_val_bpb") is not None:
            modes["pre_quant"] = float(rep["pre_quant_val_bpb"])
        if rep.get("val_bpb") is not None:
            modes.setdefault(rep.get("eval_mode", "final"), float(rep["val_bpb"]))
        return modes

    def quant_gap(self) -> float | None:
        """val_bpb − pre_quant_val_bpb (what quantization cost), None before both exist."""
        pre, post = self.report.get("pre_quant_val_bpb"), self.report.get("val_bpb")
        ttt = self.report.get("ttt") or {}
        # With TTT the final val_bpb includes adaptation; the quantization cost is the pre-TTT one.
        if ttt.get("bpb_before") is not None:
            post = ttt["bpb_before"]
        return None if pre is None or post is None else float(post) - float(pre)


def load_run(run_dir: str | Path) -> RunRecords:
    path = Path(run_dir)
    if not path.is_dir():
        raise PgolfError(f"{path}: not a run directory")
    records = rundir.read_metrics(path)
    if not records:
        raise PgolfError(
            f"{path}: no {rundir.METRICS}; train it first (`pgolf run` / `pgolf train`)"
        )
    run = RunRecords(path)
    for record in records:
        if record.get("eval_mode") == rundir.PERIODIC_EVAL:
            run.val_curve.append(record)
        elif "evaluation" in record:
            continue  # `pgolf eval` under other settings: not one of the run's own scores
        elif "eval_mode" in record:
            run.evals.append(record)
        elif "train_loss" in record:
            run.steps.append(record)
    if not run.steps and not run.evals:
        raise PgolfError(f"{path / rundir.METRICS}: no step or eval records")
    run.report = rundir.read_report(path)
    return run


def artifact_bytes_per_class(run: RunRecords) -> tuple[dict[str, float], str] | None:
    """(bytes per quantization class, source) or None when the run has no artifact yet.

    Mixed artifacts report their own split (`quant.bytes_per_class`). For the int8 + zlib artifact
    the payload is compressed as one stream, so each tensor group gets the file's bytes in
    proportion to its raw bytes, the same attribution pgolf.quant.fit uses inside a section.
    """
    per_class = (run.report.get("quant") or {}).get("bytes_per_class")
    if per_class:
        return {k: float(v) for k, v in per_class.items()}, "quant.bytes_per_class"
    artifact = run.path / rundir.ARTIFACT
    if not artifact.is_file():
        return None
    from pgolf.artifact.container import read_artifact
    from pgolf.artifact.int8 import SCALE_SUFFIX

    arrays, meta = read_artifact(artifact)
    roles = _roles(run.path)
    raw: dict[str, int] = {}
    for name, array in arrays.items():
        base = name.removesuffix(SCALE_SUFFIX)
        scheme = meta.get("tensors", {}).get(base, {}).get("scheme", "")
        group = _int8_group(base, scheme, roles.get(base))
        raw[group] = raw.get(group, 0) + array.nbytes
    total_raw = max(sum(raw.values()), 1)
    size = artifact.stat().st_size
    return {k: size * v / total_raw for k, v in sorted(raw.items())}, "int8 artifact header"


def _int8_group(name: str, scheme: str, role: str | None) -> str:
    """`class (storage)`: small tensors stay float in the int8 artifact, so the class alone would
    hide whether the bytes are int8 rows or fp16 copies."""
    from pgolf.quant.policy import quant_class

    if role == "scalar":
        return "scalar (float)"
    if scheme.startswith("int8"):
        return f"{quant_class(name, role)} (int8)"
    return f"{quant_class(name, role)} ({'fp16' if scheme == 'float' else scheme or 'other'})"


def _roles(run_dir: Path) -> dict[str, str]:
    """Parameter name → role, from a shapes-only model of the run's config (no weights read)."""
    try:
        from pgolf.model.roles import role_of
        from pgolf.model.shapes import shapes_only_model

        cfg = rundir.load_config(run_dir)
        model = shapes_only_model(cfg.model)
        return {n: role_of(p) for n, p in model.named_parameters()}
    except (OSError, ValueError, KeyError, PgolfError):
        return {}  # no usable config: group by name alone (quant_class falls back on names)
