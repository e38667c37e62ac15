"""`pgolf ablate`: a preset with each switch toggled alone and all together, over a few seeds.

Every variant × seed is an ordinary run directory under OUT (`VARIANT_sSEED`), so any of them can
be plotted, audited or resumed like a `pgolf run`. A run whose report.json already holds a final
`val_bpb` is reused, which makes an interrupted ablation resumable by running the same command.
The table compares each variant with the unmodified preset by Welch's t-test on val_bpb: seeds
are few and variants may change the variance, so the equal-variance test would overstate.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pgolf import rundir
from pgolf.audit.stats import mean_std, welch_t_test
from pgolf.errors import PgolfError
from pgolf.fileio import writable_dir

BASELINE = "baseline"
ALL = "all"


def parse_switch(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or "." not in key or not value:
        raise PgolfError(f"--switch {text!r}: expected section.key=value, e.g. model.xsa_last_n=4")
    return key.strip(), value.strip()


def variants(switches: list[str]) -> list[tuple[str, list[str]]]:
    """(name, assignments): the preset, each switch alone, then all together (if more than one)."""
    parsed = [parse_switch(s) for s in switches]
    if not parsed:
        raise PgolfError("pgolf ablate needs at least one --switch section.key=value")
    keys = [k for k, _ in parsed]
    if len(set(keys)) != len(keys):
        raise PgolfError(f"--switch sets a key twice: {keys}")
    out = [(BASELINE, [])]
    out += [(f"{k}={v}", [f"{k}={v}"]) for k, v in parsed]
    if len(parsed) > 1:
        out.append((ALL, [f"{k}={v}" for k, v in parsed]))
    return out


def slug(name: str) -> str:
    """A variant name as a directory name (switch values may hold commas, minus signs, dots)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


RunFn = Callable[[Path, list[str]], dict]


def run_ablation(
    preset: str,
    switches: list[str],
    seeds: int,
    common: list[str],
    out_dir: Path,
    run_fn: RunFn,
    base_seed: int | None = None,
    on_result: Callable[[dict], None] | None = None,
) -> dict:
    """Run (or reuse) every variant × seed through `run_fn(run_dir, assignments) -> report`."""
    from pgolf.config import resolve_config

    if seeds < 1:
        raise PgolfError(f"--seeds must be ≥ 1, got {seeds}")
    plan = variants(switches)
    # Resolve every variant up front: a typo in the last switch must fail before hours of training.
    for _, assignments in plan:
        resolve_config(preset, [*common, *assignments])
    if base_seed is None:
        base_seed = resolve_config(preset, list(common)).train.seed
    writable_dir(out_dir, "--out")
    rows = []
    for name, assignments in plan:
        for i in range(seeds):
            seed = base_seed + i
            run_dir = out_dir / f"{slug(name)}_s{seed}"
            report = rundir.finished_report(run_dir)
            skipped = report is not None
            if report is None:
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # killed half way: a fresh run is the honest result
                report = run_fn(run_dir, [*common, *assignments, f"train.seed={seed}"])
            row = {
                "variant": name,
                "seed": seed,
                "run": str(run_dir),
                "skipped": skipped,
                "val_bpb": report.get("val_bpb"),
                "pre_quant_val_bpb": report.get("pre_quant_val_bpb"),
                "bytes_total": report.get("bytes_total"),
                "train_time_s": report.get("train_time_s"),
                "eval_time_s": report.get("eval_time_s"),
            }
            rows.append(row)
            if on_result:
                on_result(row)
    table = summarize(rows, [name for name, _ in plan])
    result = {"preset": preset, "switches": switches, "seeds": seeds, "runs": rows, "table": table}
    (out_dir / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = format_markdown(result)
    (out_dir / "ablation.md").write_text(markdown + "\n")
    result["markdown"] = markdown
    return result


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], order: list[str]) -> list[dict]:
    base = [r["val_bpb"] for r in rows if r["variant"] == BASELINE]
    table = []
    for name in order:
        mine = [r for r in rows if r["variant"] == name]
        bpb = [r["val_bpb"] for r in mine]
        mean, std = mean_std(bpb)
        row = {
            "variant": name,
            "n": len(mine),
            "val_bpb_mean": mean,
            "val_bpb_std": std if len(bpb) > 1 else None,
            "delta_bpb": None if name == BASELINE else mean - mean_std(base)[0],
            "welch_t": None,
            "welch_df": None,
            "p_value": None,
            "bytes_total_mean": _mean([r["bytes_total"] for r in mine]),
            "time_s_mean": _mean(
                [(r["train_time_s"] or 0.0) + (r["eval_time_s"] or 0.0) for r in mine]
            ),
        }
        # Both sides need their own seed variance: a single seed is one draw, not a known constant
        # (pgolf.audit.stats would treat it as one, which suits published scores, not ablations).
        if name != BASELINE and len(bpb) > 1 and len(base) > 1:
            test = welch_t_test(bpb, base)
            row.update(welch_t=test.t, welch_df=test.df, p_value=test.p_two_sided)
        table.append(row)
    return table


def format_markdown(result: dict) -> str:
    def num(x: float | None, spec: str) -> str:
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    lines = [
        f"Ablation of `{result['preset']}`, {result['seeds']} seed(s) per variant; "
        "Welch's t-test of val_bpb against the preset (— needs ≥ 2 seeds per side).",
        "",
        "| variant | n | val_bpb | Δ vs preset | t | df | p | bytes_total | train+eval s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["table"]:
        bpb = num(row["val_bpb_mean"], ".4f")
        if row["val_bpb_std"] is not None:
            bpb += f" ± {row['val_bpb_std']:.4f}"
        lines.append(
            f"| `{row['variant']}` | {row['n']} | {bpb} | {num(row['delta_bpb'], '+.4f')} "
            f"| {num(row['welch_t'], '.2f')} | {num(row['welch_df'], '.1f')} "
            f"| {num(row['p_value'], '.3f')} | {num(row['bytes_total_mean'], ',.0f')} "
            f"| {num(row['time_s_mean'], '.1f')} |"
        )
    return "\n".join(lines)


def pipeline_run_fn(preset: str, echo: bool) -> RunFn:
    """Each variant through the same stages as `pgolf run`, in this process."""

    def run(run_dir: Path, assignments: list[str]) -> dict[str, Any]:
        from pgolf.config import resolve_config
        from pgolf.dist import init_world, shutdown
        from pgolf.run import run_pipeline

        cfg = resolve_config(preset, assignments)
        if cfg.illegal:
            raise PgolfError(f"preset {preset} is illegal ({cfg.illegal}); ablate refuses it")
        world = init_world()
        try:
            return run_pipeline(run_dir, cfg, world, echo=echo)
        finally:
            shutdown(world)

    return run
