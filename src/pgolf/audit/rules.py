"""`pgolf audit`: one verdict per challenge rule for a finished run.

A verdict is `{"rule", "status", "detail", "evidence"}` with status "pass", "fail" or
"unproven". "unproven" means the records cannot show the rule either way (timings measured on
other hardware than 8×H100, a run made before pgolf recorded the evidence); it is not a failure,
but it is never reported as a pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pgolf import run as run_mod
from pgolf.audit import probes
from pgolf.audit.records import byte_tables_sha256
from pgolf.audit.verdicts import FAIL, PASS, UNPROVEN, time_verdicts
from pgolf.config import RunConfig
from pgolf.data.dataset import resolve_dataset
from pgolf.data.shards import HEADER_BYTES, load_tokens
from pgolf.data.tokenizer import build_byte_tables, load_tokenizer
from pgolf.dist import World
from pgolf.errors import PgolfError
from pgolf.eval.bpb import TorchByteTables
from pgolf.eval.evaluate import batch_windows
from pgolf.eval.windows import build_tiling

BYTES_CAP = run_mod.BYTES_CAP
# A shard's identity for the data check: its first 64 KiB of tokens after the header. Hashing
# whole 200 MB shards would make the audit slower than the evaluation it checks.
_IDENTITY_BYTES = 1 << 16


def verdict(rule: str, status: str, detail: str, **evidence: Any) -> dict:
    return {"rule": rule, "status": status, "detail": detail, "evidence": evidence}


def _status(ok: bool) -> str:
    return PASS if ok else FAIL


def load_run(run_dir: Path) -> tuple[RunConfig, dict]:
    """The run's config and report, or a PgolfError (bad input, exit 2)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PgolfError(f"{run_dir}: run directory not found")
    cfg = run_mod.load_run_config(run_dir)
    report = run_mod.read_report(run_dir)
    if "val_bpb" not in report:
        raise PgolfError(f"{run_dir}: no evaluated report.json; run `pgolf eval {run_dir}` first")
    return cfg, report


# -- records -------------------------------------------------------------------------------
def check_artifact(run_dir: Path, cfg: RunConfig, report: dict) -> dict:
    from pgolf.export.bundle import bundle_script  # the script an export would ship

    artifact = run_dir / run_mod.ARTIFACT_NAME
    if not artifact.is_file():
        return verdict("artifact_bytes", FAIL, f"{artifact} missing")
    bytes_model = artifact.stat().st_size
    bytes_code = len(bundle_script(cfg.to_dict()).encode("utf-8"))
    total = bytes_code + bytes_model
    stale = report.get("bytes_model") != bytes_model
    detail = (
        f"{total:,} = {bytes_code:,} code (the exported train_gpt.py) + {bytes_model:,} model "
        f"(on disk) of {BYTES_CAP:,} decimal bytes"
    )
    if stale:
        detail += f"; report.json says bytes_model {report.get('bytes_model')} (stale report)"
    return verdict(
        "artifact_bytes",
        _status(total <= BYTES_CAP and not stale),
        detail,
        bytes_code=bytes_code,
        bytes_model=bytes_model,
        bytes_total=total,
        report_bytes_total=report.get("bytes_total"),
        cap=BYTES_CAP,
    )


def check_time(report: dict) -> list[dict]:
    """Training and eval time, as the run's own compliance record states them (one function)."""
    return [
        verdict(rule, v["status"], v["detail"], seconds=v["seconds"], hardware=v["hardware"])
        for rule, v in time_verdicts(report).items()
    ]


def _shard_identity(path: Path) -> tuple[int, str]:
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        head = f.read(_IDENTITY_BYTES)
    return os.path.getsize(path), hashlib.sha256(head).hexdigest()


def check_data(cfg: RunConfig, report: dict) -> dict:
    files = report.get("data_files")
    if report.get("prequant_ttt"):
        return verdict(
            "data_separation",
            FAIL,
            "pre-quant TTT trained on validation tokens before they were scored (SPEC §5.30)",
        )
    if not files:
        return verdict("data_separation", UNPROVEN, "the run recorded no list of opened shards")
    calib = report.get("calibration") or {}
    if calib.get("calib_source") not in (None, "none", "train", "selfgen"):
        return verdict("data_separation", FAIL, f"calibration source {calib.get('calib_source')!r}")
    train = [Path(p) for p in files["train"]]
    val = [Path(p) for p in files["val"]]
    calib_files = [Path(p) for p in calib.get("files", [])]
    problems = []
    if not train:
        problems.append("no training shards recorded")
    if set(calib_files) - set(train):
        problems.append("calibration read files outside the training set")
    val_ids = {}
    for p in val:
        if p.is_file():
            val_ids[_shard_identity(p)] = p
    for p in train + calib_files:
        if p in val or "_val_" in p.name:
            problems.append(f"{p} is a validation shard")
        elif p.is_file() and _shard_identity(p) in val_ids:
            problems.append(f"{p} has the same content as {val_ids[_shard_identity(p)]}")
    detail = (
        f"training read {len(train)} shard(s), calibration ({calib.get('calib_source', 'none')}) "
        f"{len(calib_files)}; none is or duplicates one of the {len(val)} validation shard(s)"
    )
    return verdict(
        "data_separation",
        FAIL if problems else PASS,
        "; ".join(problems) if problems else detail,
        train=[str(p) for p in train],
        val=[str(p) for p in val],
        calibration=[str(p) for p in calib_files],
    )


def check_tokenizer(cfg: RunConfig, report: dict, tables) -> dict:
    recorded = report.get("byte_tables_sha256")
    now = byte_tables_sha256(tables)
    if not recorded:
        return verdict("tokenizer_byte_tables", UNPROVEN, "the run recorded no byte-table hash")
    detail = (
        "byte tables rebuilt from the tokenizer file "
        + ("match" if now == recorded else "DIFFER FROM")
        + f" those the evaluation used (sha256 {now[:12]}… vs {recorded[:12]}…)"
    )
    return verdict("tokenizer_byte_tables", _status(now == recorded), detail, sha256=now)


def check_coverage(cfg: RunConfig, report: dict, val_tokens: np.ndarray) -> dict:
    seq_len = run_mod.eval_seq_len(cfg)
    ev = cfg.eval
    tiling = build_tiling(val_tokens, seq_len, ev.eval_mode, ev.eval_stride, ev.per_document_reset)
    scored = int(report.get("val_tokens", -1))
    once = (report.get("compliance", {}).get("scored_exactly_once") or {}).get("ok", False)
    trimmed = tiling.num_targets - tiling.num_scored
    ok = scored == tiling.num_scored and once and not ev.max_val_tokens
    detail = (
        f"{scored:,} targets scored of {tiling.num_scored:,} in the full validation stream "
        f"({ev.eval_mode}, T={seq_len})"
    )
    if trimmed:
        detail += f"; {trimmed:,} tail targets trimmed as the official eval does (SPEC §3.5)"
    if ev.max_val_tokens:
        detail += f"; eval.max_val_tokens={ev.max_val_tokens} cut the stream"
    if not once:
        detail += "; the ledger did not confirm each target scored once"
    return verdict(
        "coverage", _status(ok), detail, scored=scored, expected=tiling.num_scored, once=once
    )


def check_temperature(cfg: RunConfig, report: dict) -> dict:
    used = report.get("temperature", cfg.eval.temperature)
    unchanged = report.get("config_sha256") == cfg.sha256()
    if used == 1.0 and cfg.eval.temperature == 1.0:
        return verdict("temperature", PASS, "logits scored at temperature 1", temperature=1.0)
    # A temperature fixed in config.json before training began was set before any validation
    # token was seen; one changed afterwards (or one differing from the config) was not.
    ok = unchanged and used == cfg.eval.temperature
    detail = f"temperature {used:g} " + (
        "fixed in config.json before training (config hash unchanged)"
        if ok
        else "differs from, or was changed in, the config the run trained with"
    )
    return verdict("temperature", _status(ok), detail, temperature=used)


def _metric_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_late_optimisation(run_dir: Path, cfg: RunConfig, report: dict) -> dict:
    if report.get("prequant_ttt"):
        return verdict(
            "no_late_optimisation",
            FAIL,
            "pre-quant TTT optimised the model on validation data after the training clock "
            "stopped: " + str(report["prequant_ttt"].get("reason", "")),
        )
    records = _metric_records(run_dir)
    steps = int(report.get("steps", 0))
    train_steps = [r["step"] for r in records if "train_loss" in r and "step" in r]
    first_eval = next((i for i, r in enumerate(records) if "eval_mode" in r), len(records))
    late = [r.get("step") for r in records[first_eval:] if "train_loss" in r]
    over = [s for s in train_steps if s > steps]
    ttt = report.get("ttt")
    ttt_ok = ttt is None or ttt.get("bpb_after") == report.get("val_bpb")
    ok = not late and not over and ttt_ok
    detail = (
        f"{len(train_steps)} logged training steps, the last ≤ {steps}; none after the first "
        "evaluation; " + ("score-first TTT (s_0 reported)" if ttt else "no eval-time adaptation")
    )
    if not ttt_ok:
        detail += "; the reported val_bpb is not the TTT first-pass score"
    return verdict("no_late_optimisation", _status(ok), detail, late_steps=late + over)


# -- probes --------------------------------------------------------------------------------
def probe_world() -> World:
    """One process on the device `pgolf run` would pick: record-size probes need a GPU."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if os.environ.get("PGOLF_DEVICE", "").lower() == "cpu":
        device = torch.device("cpu")
    return World(rank=0, world_size=1, local_rank=0, device=device)


def load_probe_model(run_dir: Path, cfg: RunConfig, device):
    """The artifact model as the evaluation loads it (tests swap this to plant a violation)."""
    return run_mod.load_artifact_model(run_dir, cfg, device)


def check_probes(
    run_dir: Path, cfg: RunConfig, report: dict, val_tokens: np.ndarray, tables, world: World
) -> list[dict]:
    model = load_probe_model(run_dir, cfg, world.device)
    seq_len = run_mod.eval_seq_len(cfg)
    ev = cfg.eval
    torch_tables = TorchByteTables(tables, world.device)
    vocab = cfg.model.vocab_size
    c1 = probes.causality_probe(model, val_tokens, seq_len, ev.temperature, vocab, world.device)
    c2 = probes.normalisation_probe(
        model, val_tokens, seq_len, ev.temperature, vocab, torch_tables, world
    )
    out = [
        verdict("c1_causality", _status(c1["ok"]), c1["detail"]),
        verdict("c2_normalisation", _status(c2["ok"]), c2["detail"]),
    ]
    ttt = report.get("ttt")
    if report.get("prequant_ttt"):
        out.append(
            verdict(
                "c3_score_before_update",
                FAIL,
                "pre-quant TTT adapted on every validation token before scoring it (SPEC §5.30)",
            )
        )
    elif not ev.ttt_enabled and ttt is None:
        out.append(verdict("c3_score_before_update", PASS, "no evaluation-time adaptation"))
    else:
        poison = probes.poison_probe(
            model, val_tokens, ev, seq_len, torch_tables, world, batch_windows(ev, seq_len, world)
        )
        recorded = (report.get("compliance", {}).get("score_first") or {}).get("ok", False)
        ok = poison["ok"] and recorded
        detail = poison["detail"] + ("" if recorded else "; the run's ledger record is not ok")
        evidence = {k: v for k, v in poison.items() if k not in ("ok", "detail")}
        out.append(verdict("c3_score_before_update", _status(ok), detail, **evidence))
    out.append(check_single_pass(cfg, report))
    return out


def check_single_pass(cfg: RunConfig, report: dict) -> dict:
    ttt = report.get("ttt")
    once = (report.get("compliance", {}).get("scored_exactly_once") or {}).get("ok", False)
    problems = []
    if not once:
        problems.append("the ledger did not confirm each target scored once")
    if ttt:
        if ttt.get("chunks_scored") != ttt.get("num_chunks"):
            problems.append(
                f"TTT scored {ttt.get('chunks_scored')} of {ttt.get('num_chunks')} chunks"
            )
        if ttt.get("bpb_after") != report.get("val_bpb"):
            problems.append("the reported score is not the first-pass s_0")
    detail = "; ".join(problems) or (
        "every target scored once (ledger); the reported number is the first pass"
        + (f" over all {ttt['num_chunks']} TTT chunks" if ttt else "")
    )
    return verdict("c4_single_pass", FAIL if problems else PASS, detail)


# -- the whole audit -----------------------------------------------------------------------
def audit_run(run_dir: Path, world: World | None = None) -> dict:
    run_dir = Path(run_dir)
    cfg, report = load_run(run_dir)
    world = world or probe_world()
    files = resolve_dataset(cfg.data)
    val_tokens = np.asarray(load_tokens(files.val))
    tables = build_byte_tables(load_tokenizer(files.tokenizer), cfg.model.vocab_size)
    verdicts = [
        check_artifact(run_dir, cfg, report),
        *check_time(report),
        check_data(cfg, report),
        *check_probes(run_dir, cfg, report, val_tokens, tables, world),
        check_tokenizer(cfg, report, tables),
        check_coverage(cfg, report, val_tokens),
        check_temperature(cfg, report),
        check_late_optimisation(run_dir, cfg, report),
    ]
    return {
        "run": str(run_dir),
        "ok": all(v["status"] != FAIL for v in verdicts),
        "proven": all(v["status"] == PASS for v in verdicts),
        "verdicts": verdicts,
    }
