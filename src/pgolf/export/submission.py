"""`pgolf export`: the records folder of SPEC §1.6 from one or more seed runs of one config.

README.md (techniques with SPEC references, per-seed results, compliance), submission.json,
train_seed<S>.log per run, requirements.txt, and the single-file train_gpt.py of
`pgolf.export.bundle` (lzma-wrapped: the lean script where it implements the config, else the
bundle of pgolf's modules), whose size is `bytes_code`, with its readable form
train_gpt_readable.py beside it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

import pgolf
from pgolf import rundir
from pgolf.audit.compare import load_seed_runs
from pgolf.config import load_preset
from pgolf.errors import PgolfError
from pgolf.export.bundle import bundled_code, is_lean, readable_script, shipped_script
from pgolf.fileio import writable_dir, write_text_atomic
from pgolf.rules import BYTES_CAP, FAIL, PASS, artifact_size, combined, ok_of, status_of

# config keys that switch a technique on, with the SPEC section that describes it
TECHNIQUES = {
    ("eval", "eval_mode"): "§3.6 sliding-window evaluation",
    ("eval", "ttt_enabled"): "§5.29 score-first (legal) TTT",
    ("eval", "prequant_ttt_enabled"): "§5.30 pre-quant TTT on validation data (ILLEGAL)",
    ("quant", "codec"): "§5.19–5.21 quantised storage, per-role precision, GPTQ",
    ("quant", "compressor"): "§5.25 compression back-ends",
    ("quant", "calib_source"): "§5.23 calibration source (§1.3 timing)",
    ("train", "ema_decay"): "§5.5 EMA of weights",
    ("train", "late_qat_threshold"): "§5.12 late QAT",
    ("model", "num_layers"): "§5.2 wider / deeper",
    ("model", "model_dim"): "§5.2 wider / deeper",
    ("model", "xsa_last_n"): "§5.4 XSA",
    ("model", "bigram_vocab_size"): "§5.8 BigramHash embedding",
    ("model", "smear_gate"): "§5.7 SmearGate",
    ("model", "rope_dims"): "§5.9 partial RoPE",
    ("model", "ln_scale"): "§5.10 LN scale",
    ("model", "mlp_leaky_slope"): "§5.13 LeakyReLU(0.5)²",
    ("model", "logit_softcap"): "§5.15 logit softcap",
}
# import name → distribution name, where they differ
_DISTRIBUTIONS = {"yaml": "pyyaml"}
_STDLIB_BACKPORTS = {"tomli": "tomli; python_version < '3.11'"}
_IMPORT_ERRORS = ("ImportError", "ModuleNotFoundError")
# Imported only by the codecs that use them; the mixed quantizer's fit-to-budget may try them all.
_MIXED_EXPORT_COMPRESSORS = ("brotli", "zstandard")


def git_user_name() -> str:
    """`git config user.name`, or "" (never the e-mail address: submission.json is public)."""
    try:
        out = subprocess.run(
            ["git", "config", "user.name"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in _IMPORT_ERRORS for t in types)


def required_imports(tree: ast.Module) -> set[str]:
    """Top-level names of the modules `tree` imports, less optional ones.

    An import in the body of a `try` that handles ImportError is optional (the code runs
    without it); one in the handler is the fallback and is required.
    """
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(map(_catches_import_error, node.handlers)):
            optional.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    names = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def third_party_requirements(config: dict) -> list[str]:
    """Pinned distributions the exported script needs (stdlib and pgolf excluded).

    Those the bundled code imports unconditionally, plus the optional compressors when the
    config's quantizer can use them.
    """
    names = set()
    if is_lean(config):
        sources = [readable_script(config)]
    else:
        sources = list(bundled_code(config).readable().values())
    for source in sources:
        names |= required_imports(ast.parse(source))
    if config.get("quant", {}).get("codec") == "mixed":
        names |= set(_MIXED_EXPORT_COMPRESSORS)
    names -= set(sys.stdlib_module_names) | {"pgolf", "__future__"}
    lines = []
    for name in sorted(names):
        if name in _STDLIB_BACKPORTS:  # imported only on older Pythons
            lines.append(_STDLIB_BACKPORTS[name])
            continue
        dist = _DISTRIBUTIONS.get(name, name)
        try:
            # a local label (torch's "+cpu", "+cu128") names a wheel index, not a PyPI release
            version = importlib.metadata.version(dist).split("+")[0]
            lines.append(f"{dist}=={version}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(dist)
    return lines


def technique_rows(config: dict) -> list[tuple[str, str, str]]:
    """(setting, value, SPEC reference) for every setting that differs from the baseline preset."""
    base = load_preset("baseline").to_dict()
    rows = []
    for section, values in config.items():
        if not isinstance(values, dict) or section == "data":
            continue
        for key, value in values.items():
            if base.get(section, {}).get(key) != value and (section, key) != ("train", "seed"):
                ref = TECHNIQUES.get((section, key), "—")
                rows.append((f"{section}.{key}", json.dumps(value), ref))
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def build_submission(
    runs: list[str | Path],
    script_bytes: int,
    author: str,
    github_id: str,
    name: str,
    blurb: str,
) -> dict:
    rows = load_seed_runs(runs)
    reports = [rundir.load_evaluated(Path(r))[1] for r in runs]
    results = {}
    for row, report in zip(rows, reports, strict=True):
        results[str(row["seed"])] = {
            "val_loss": report["val_loss"],
            "val_bpb": report["val_bpb"],
            "bytes_model": report.get("bytes_model"),
            "bytes_total": script_bytes + int(report.get("bytes_model", 0)),
            "steps": report.get("steps"),
            "train_time_s": report.get("train_time_s"),
            "calib_time_s": report.get("calib_time_s"),
            "eval_time_s": report.get("eval_time_s"),
            "pre_quant_val_bpb": report.get("pre_quant_val_bpb"),
        }
    totals = [r["bytes_total"] for r in results.values()]
    losses = [float(r["val_loss"]) for r in rows]
    bpbs = [float(r["val_bpb"]) for r in rows]

    def std(values: list[float]) -> float:
        m = _mean(values)
        return (
            (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5
            if len(values) > 1
            else 0.0
        )

    # true = pass, false = fail, null = unproven (pgolf.rules)
    compliance = {
        key: ok_of(status)
        for key, (status, _) in compliance_verdicts(reports, script_bytes).items()
    }
    compliance["no_pre_quant_ttt"] = not any(rep.get("prequant_ttt") for rep in reports)
    compliance["three_seeds"] = len(rows) >= 3
    return {
        "author": author,
        "github_id": github_id,
        "name": name,
        "blurb": blurb,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "track": "10min_16mb",
        "val_loss": _mean(losses),
        "val_bpb": _mean(bpbs),
        "val_loss_std": std(losses),
        "val_bpb_std": std(bpbs),
        "bytes_total": max(totals),
        "bytes_code": script_bytes,
        "artifact_bytes_mean": _mean([float(r["bytes_model"] or 0) for r in results.values()]),
        "artifact_bytes_max": max(int(r["bytes_model"] or 0) for r in results.values()),
        "pre_quant_val_bpb": _mean([float(r.get("pre_quant_val_bpb") or 0) for r in reports]),
        "seeds": [r["seed"] for r in rows],
        "seed_results": results,
        "hardware": sorted({f"{rep.get('world_size')}x{rep.get('device')}" for rep in reports}),
        "pytorch_version": torch.__version__,
        "pgolf_version": pgolf.__version__,
        "compliance": compliance,
    }


def compliance_verdicts(reports: list[dict], script_bytes: int) -> dict[str, tuple[str, str]]:
    """(status, detail) per rule over the seeds: each report's own verdicts (pgolf.rules),
    combined; the byte rule once more for the submission's bytes: this train_gpt.py plus the
    largest seed's artifact."""
    per_seed: dict[str, list[tuple[str, str]]] = {}
    for report in reports:
        for key, entry in report.get("compliance", {}).items():
            per_seed.setdefault(key, []).append((status_of(entry), entry.get("detail", "")))
    out = {}
    for key, seeds in sorted(per_seed.items()):
        status = combined(s for s, _ in seeds)
        # The detail of a seed with the combined status: the one that decided it.
        out[key] = next((s, d) for s, d in seeds if s == status)
    size = artifact_size(script_bytes, max(int(r.get("bytes_model", 0)) for r in reports))
    out[size["rule"]] = (size["status"], size["detail"])
    return out


# What README says train_gpt.py is, for the bundle (False) and for the lean script (True).
SCRIPT_NOTE = {
    False: (
        "`train_gpt.py` is self-contained: it carries the pgolf code the pipeline runs and",
        "the config below, and trains, quantizes, packs and evaluates as `pgolf run` did. It",
        "ships lzma-compressed (its size is the code bytes); `train_gpt_readable.py` is the same",
        "script before minification, for review: it runs the same, and the modules `train_gpt.py`",
        "embeds are its modules with docstrings, comments and annotations removed.",
    ),
    True: (
        "`train_gpt.py` is self-contained: pgolf's lean, record-style script with the config",
        "below folded into its code, which trains, quantizes, packs and evaluates as `pgolf run`",
        "did, to the same val_bpb and artifact bytes. It reads only DATA_PATH, RUN_DIR, SEED,",
        "ITERATIONS and MAX_WALLCLOCK_SECONDS from the environment. It ships lzma-compressed",
        "(its size is the code bytes); `train_gpt_readable.py` is the same script before",
        "minification, for review: it runs the same.",
    ),
}


def render_readme(sub: dict, config: dict, reports: list[dict]) -> str:
    lines = [
        f"# {sub['name']}",
        "",
        sub["blurb"] or "Generated by `pgolf export`.",
        "",
        f"**val_bpb {sub['val_bpb']:.6f}** (mean of {len(sub['seeds'])} seed(s), std "
        f"{sub['val_bpb_std']:.6f}); val_loss {sub['val_loss']:.6f} nats/token; "
        f"bytes_total {sub['bytes_total']:,} of {BYTES_CAP:,} "
        f"({sub['bytes_code']:,} code + up to {sub['artifact_bytes_max']:,} model).",
        "",
        "## Run it",
        "",
        "From inside this folder, with the dataset directory (shards + `tokenizer.model`) at",
        "`./data` or `DATA_PATH`:",
        "",
        "```",
        "pip install -r requirements.txt",
        "SEED=<seed> torchrun --standalone --nproc_per_node=8 train_gpt.py",
        "```",
        "",
        *SCRIPT_NOTE[is_lean(config)],
        "",
        "## Techniques (settings that differ from the official baseline)",
        "",
        "| setting | value | SPEC |",
        "|---|---|---|",
    ]
    rows = technique_rows(config)
    lines += [f"| `{k}` | `{v}` | {ref} |" for k, v, ref in rows] or ["| — | — | — |"]
    lines += [
        "",
        "## Results per seed",
        "",
        "| seed | val_loss | val_bpb | pre-quant bpb | steps | bytes_total | train s | eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed, r in sub["seed_results"].items():
        lines.append(
            f"| {seed} | {r['val_loss']:.6f} | {r['val_bpb']:.6f} | "
            f"{(r['pre_quant_val_bpb'] or 0):.6f} | {r['steps']} | {r['bytes_total']:,} | "
            f"{(r['train_time_s'] or 0):.1f} | {(r['eval_time_s'] or 0):.1f} |"
        )
    lines += [
        "",
        "## Compliance (from each run's report)",
        "",
        "| rule | status | detail |",
        "|---|---|---|",
    ]
    verdicts = compliance_verdicts(reports, sub["bytes_code"])
    for key, ok in sub["compliance"].items():
        status, detail = verdicts.get(key, (PASS if ok else FAIL, ""))
        lines.append(f"| {key} | {status if status != FAIL else '**fail**'} | {detail} |")
    lines += [
        "",
        "Timings measured on other hardware than 8×H100 do not prove the time budgets;",
        "run `pgolf audit RUN` for the full per-rule verdicts (C1–C4 probes included).",
        "",
    ]
    return "\n".join(lines)


def export_submission(
    runs: list[str | Path],
    out: str | Path,
    *,
    force: bool = False,
    author: str | None = None,
    github_id: str | None = None,
    name: str | None = None,
    blurb: str | None = None,
) -> dict:
    out = Path(out)
    if out.exists() and not force:
        raise PgolfError(f"{out} already exists; pass --force to overwrite it")
    if out.exists() and not out.is_dir():
        raise PgolfError(f"{out} exists and is not a folder")
    runs = [Path(r) for r in runs]
    cfg, _ = rundir.load_evaluated(runs[0])
    load_seed_runs(runs)  # same config, distinct seeds: checked before anything is written
    script = shipped_script(cfg.to_dict())
    script_bytes = len(script.encode("utf-8"))
    sub = build_submission(
        runs,
        script_bytes,
        author=author or git_user_name() or "unknown",
        github_id=github_id or "",
        name=name or f"pgolf {cfg.preset}",
        blurb=blurb or "",
    )
    reports = [rundir.load_evaluated(r)[1] for r in runs]
    writable_dir(out, "--out")
    written = []

    def write(file: str, text: str) -> None:
        write_text_atomic(out / file, text)
        written.append(file)

    write("train_gpt.py", script)
    # for review (the shipped modules are these, minified): not counted, not needed to run
    write("train_gpt_readable.py", readable_script(cfg.to_dict()))
    write("submission.json", json.dumps(sub, indent=2) + "\n")
    write("README.md", render_readme(sub, cfg.to_dict(), reports))
    write("requirements.txt", "\n".join(third_party_requirements(cfg.to_dict())) + "\n")
    for run, seed in zip(runs, sub["seeds"], strict=True):
        log = run / rundir.TRAIN_LOG
        if log.is_file():
            write(f"train_seed{seed}.log", log.read_text(encoding="utf-8"))
    return {"out": str(out), "files": sorted(written), "submission": sub}
