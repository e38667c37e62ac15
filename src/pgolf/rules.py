"""Every challenge rule once (SPEC §1), each a function from evidence to one verdict.

A verdict is `{"rule", "status", "detail", "evidence"}`; status is "pass", "fail" or "unproven".
"unproven" means the evidence cannot show the rule either way (timings measured on other
hardware than 8×H100, a run made before pgolf recorded the evidence): never a failure, never a
pass. report.json's `compliance` is `compliance(report, cfg)`; `pgolf audit` calls the same
functions on evidence it re-measures and adds its probes (pgolf.audit.checks); `pgolf export`
aggregates the reports' verdicts over seeds. Each rule's name is its key everywhere:
report.json, the audit, submission.json (whose official keys the byte and time rules use).
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pgolf
from pgolf.data.shards import HEADER_BYTES
from pgolf.rundir import PERIODIC_EVAL

if TYPE_CHECKING:
    from pgolf.config import RunConfig

PASS, FAIL, UNPROVEN = "pass", "fail", "unproven"
BYTES_CAP = 16_000_000  # decimal bytes (SPEC §1.2), not 16 MiB
TIME_CAP_S = 600.0  # each of training and evaluation (SPEC §1.3)
TRACK_HARDWARE = (8, "cuda")  # 8×H100 SXM: the only hardware whose timings prove the budgets
# A shard's identity for the data check: its first 64 KiB of tokens after the header. Hashing
# whole 200 MB shards would make the check slower than the evaluation it checks.
_IDENTITY_BYTES = 1 << 16


# -- the verdict vocabulary --------------------------------------------------------------------
def verdict(rule: str, status: str, detail: str, **evidence: Any) -> dict:
    return {"rule": rule, "status": status, "detail": detail, "evidence": evidence}


def passed(ok: bool) -> str:
    return PASS if ok else FAIL


def ok_of(status: str) -> bool | None:
    """submission.json's boolean: true (pass), false (fail), null (unproven)."""
    return {PASS: True, FAIL: False}.get(status)


def status_of(entry: dict) -> str:
    """The status of a report.json compliance entry (reports before `status` have `ok` only)."""
    if "status" in entry:
        return entry["status"]
    return {True: PASS, False: FAIL}.get(entry.get("ok"), UNPROVEN)


def combined(statuses: Iterable[str]) -> str:
    """Over several seeds: any fail fails, else any unproven leaves it unproven."""
    statuses = set(statuses)
    return FAIL if FAIL in statuses else UNPROVEN if UNPROVEN in statuses else PASS


# -- bytes (SPEC §1.2) -------------------------------------------------------------------------
def shipped_code_bytes(config: dict) -> tuple[int, str]:
    """UTF-8 bytes of the train_gpt.py `pgolf export` would write for `config`, and what that is.

    Inside an exported script every pgolf module's `__file__` is the script itself (bundle.py),
    which is then the file that ships; elsewhere the exporter builds it without writing it.
    """
    here = Path(pgolf.__file__)
    if here.name != "__init__.py":
        return here.stat().st_size, "this exported script"
    # Imported by name, not by an import statement: bundle.py embeds every module such a
    # statement reaches, and an exported script (handled above) never needs the exporter.
    bundle = importlib.import_module("pgolf.export.bundle")
    return len(bundle.shipped_script(config).encode("utf-8")), "the shipped train_gpt.py"


def artifact_size(bytes_code: int, bytes_model: int) -> dict:
    total = bytes_code + bytes_model
    return verdict(
        "artifact_under_16mb",
        passed(total <= BYTES_CAP),
        f"{total:,} = {bytes_code:,} code (the shipped train_gpt.py) + {bytes_model:,} model "
        f"of {BYTES_CAP:,} decimal bytes",
        bytes_code=bytes_code,
        bytes_model=bytes_model,
        bytes_total=total,
        cap=BYTES_CAP,
    )


# -- time (SPEC §1.3) --------------------------------------------------------------------------
def _time_verdict(rule: str, seconds: float, what: str, device, world_size) -> dict:
    hardware = f"{world_size}×{device}"
    detail = f"{seconds:.1f} s {what} (cap {TIME_CAP_S:g} s)"
    if math.isnan(seconds):
        status, detail = UNPROVEN, f"{what}: not recorded"
    elif (world_size, str(device).split(":")[0]) != TRACK_HARDWARE:
        status = UNPROVEN
        detail += f", measured on {hardware}: this does not prove the 8×H100 budget"
    else:
        status = passed(seconds <= TIME_CAP_S)
        detail += f" on {hardware}"
        if status == PASS:
            detail += " (GPU model not recorded: check it is H100 SXM)"
    return verdict(rule, status, detail, seconds=seconds, hardware=hardware)


def training_time(report: dict) -> dict:
    """Training seconds plus calibration that read training data: that is training too."""
    from_train = (report.get("calibration") or {}).get("calib_source") == "train"
    calib_s = float(report.get("calib_time_s") or 0.0) if from_train else 0.0
    return _time_verdict(
        "training_under_600s",
        float(report.get("train_time_s", math.nan)) + calib_s,
        f"training incl. {calib_s:.1f} s train-data calibration",
        report.get("device"),
        report.get("world_size"),
    )


def eval_time(report: dict) -> dict:
    return _time_verdict(
        "eval_under_600s",
        float(report.get("eval_time_s", math.nan)),
        "from artifact load to the last score",
        report.get("eval_device", report.get("device")),
        report.get("eval_world_size", report.get("world_size")),
    )


# -- evaluation (SPEC §1.4, §3) ----------------------------------------------------------------
def score_first(report: dict) -> dict:
    """No update uses a token before it is scored, and the score reported is the first pass."""
    prequant, ttt = report.get("prequant_ttt"), report.get("ttt")
    if prequant:
        return verdict("score_first", FAIL, str(prequant.get("reason", "pre-quant TTT")))
    if not ttt:
        return verdict("score_first", PASS, "no test-time training")
    problems = []
    if ttt.get("chunks_trained", 0) >= max(ttt.get("chunks_scored", 0), 1):
        problems.append("the last scored chunk was trained on")
    if ttt.get("bpb_after") != report.get("val_bpb"):
        problems.append("the reported val_bpb is not the first-pass s_0")
    detail = "; ".join(problems) or (
        "s_0 only: each chunk scored before any update on it (ledger-enforced); "
        "last chunk not trained; nothing rescored"
    )
    return verdict(
        "score_first",
        FAIL if problems else PASS,
        detail,
        chunks_scored=ttt.get("chunks_scored"),
        chunks_trained=ttt.get("chunks_trained"),
    )


def scored_once(report: dict) -> dict:
    ledger_targets, scored = report.get("ledger_targets"), int(report["val_tokens"])
    if ledger_targets is None:
        return verdict("scored_exactly_once", UNPROVEN, "the run recorded no ledger count")
    return verdict(
        "scored_exactly_once",
        passed(ledger_targets == scored),
        f"ledger: {ledger_targets:,} targets, each scored once; the sums count {scored:,}",
        ledger_targets=ledger_targets,
        scored=scored,
    )


def coverage(scored: int, expected: int | None, cut: str | None = None) -> dict:
    """Every scorable target of the full validation stream scored. `expected` excludes the
    tail the official eval trims too (SPEC §3.5); `cut` says what stopped short, if anything."""
    if expected is None:
        return verdict("full_validation_coverage", UNPROVEN, "the run recorded no target count")
    detail = f"{scored:,} of {expected:,} scorable validation targets scored"
    if cut:
        detail += f"; {cut}"
    return verdict(
        "full_validation_coverage",
        passed(scored == expected and not cut),
        detail,
        scored=scored,
        expected=expected,
    )


def temperature(report: dict, cfg: RunConfig) -> dict:
    """Logits at temperature 1, or at one fixed in config.json before training began (so before
    any validation token was seen); one chosen afterwards was tuned on validation data."""
    used = report.get("temperature", cfg.eval.temperature)
    if used == 1.0:
        return verdict("temperature", PASS, "logits scored at temperature 1", temperature=1.0)
    # the config hash train_stage recorded is that of config.json when training began
    ok = report.get("config_sha256") == cfg.sha256() and used == cfg.eval.temperature
    detail = f"temperature {used:g} " + (
        "fixed in config.json before training (config hash unchanged)"
        if ok
        else "differs from, or was changed in, the config the run trained with"
    )
    return verdict("temperature", passed(ok), detail, temperature=used)


def normalisation(probe: dict | None) -> dict:
    """A full softmax over the vocabulary: the probe of pgolf.eval.normalisation, run on the
    evaluated model, sums the scored probabilities of every candidate target."""
    if not probe:
        return verdict("normalisation", UNPROVEN, "the run recorded no normalisation probe")
    return verdict(
        "normalisation",
        passed(probe["ok"]),
        probe["detail"],
        max_mass_error=probe.get("max_mass_error"),
    )


def tokenizer_tables(recorded: str | None, rebuilt: str) -> dict:
    """The BPB denominator's byte tables, rebuilt from the tokenizer file, are those the
    evaluation used (a silently different denominator is the classic BPB error, SPEC §3.4)."""
    if not recorded:
        return verdict("tokenizer_byte_tables", UNPROVEN, "the run recorded no byte-table hash")
    detail = (
        "byte tables rebuilt from the tokenizer file "
        + ("match" if rebuilt == recorded else "DIFFER FROM")
        + f" those the evaluation used (sha256 {rebuilt[:12]}… vs {recorded[:12]}…)"
    )
    return verdict("tokenizer_byte_tables", passed(rebuilt == recorded), detail, sha256=rebuilt)


# -- data (SPEC §1.2, §1.4) --------------------------------------------------------------------
def _shard_identity(path: Path) -> tuple[int, str]:
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        head = f.read(_IDENTITY_BYTES)
    return os.path.getsize(path), hashlib.sha256(head).hexdigest()


def data_separation(report: dict) -> dict:
    """Training and calibration read no validation shard, by name or by content."""
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
    val_ids = {_shard_identity(p): p for p in val if p.is_file()}
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


def no_late_optimisation(records: list[dict], report: dict) -> dict:
    """No optimisation after the training clock stopped: metrics.jsonl (`records`) logs no
    training step after the first evaluation of the trained model, nor past the last step."""
    if report.get("prequant_ttt"):
        return verdict(
            "no_late_optimisation",
            FAIL,
            "pre-quant TTT optimised the model on validation data after the training clock "
            "stopped: " + str(report["prequant_ttt"].get("reason", "")),
        )
    steps = int(report.get("steps", 0))
    train_steps = [r["step"] for r in records if "train_loss" in r and "step" in r]
    final = (i for i, r in enumerate(records) if r.get("eval_mode", PERIODIC_EVAL) != PERIODIC_EVAL)
    first_eval = next(final, len(records))
    late = [r.get("step") for r in records[first_eval:] if "train_loss" in r]
    late += [s for s in train_steps if s > steps]
    detail = (
        f"{len(train_steps)} logged training steps, the last ≤ {steps}; none after the first "
        "evaluation of the trained model"
    )
    if late:
        detail = f"training steps {late} logged after the training clock stopped"
    return verdict("no_late_optimisation", passed(not late), detail, late_steps=late)


# -- the run's record --------------------------------------------------------------------------
def recorded(report: dict, cfg: RunConfig) -> list[dict]:
    """The rules report.json's own fields decide (the audit has no better evidence for them)."""
    return [
        training_time(report),
        eval_time(report),
        data_separation(report),
        score_first(report),
        scored_once(report),
        temperature(report, cfg),
    ]


def compliance(report: dict, cfg: RunConfig) -> dict[str, dict]:
    """report.json's `compliance`: rule → {status, ok, detail, evidence}, from the report's own
    fields and the config the run trained with."""
    verdicts = [
        artifact_size(int(report["bytes_code"]), int(report.get("bytes_model", 0))),
        *recorded(report, cfg),
        coverage(
            int(report["val_tokens"]), report.get("scorable_targets"), report.get("partial_reason")
        ),
        normalisation(report.get("normalisation")),
    ]
    return {
        v["rule"]: {
            "status": v["status"],
            "ok": ok_of(v["status"]),
            "detail": v["detail"],
            "evidence": v["evidence"],
        }
        for v in verdicts
    }
