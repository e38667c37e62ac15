"""`pgolf audit`: one verdict per challenge rule for a finished run.

The rules are pgolf.rules'; the audit feeds them evidence it measures again (the artifact on
disk, the script that would ship, the tokenizer's byte tables, the full validation stream, the
normalisation probe on the artifact model) rather than the run's word, and adds the probes
of pgolf.audit.probes on top: C1 causality and C3 score-before-update.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pgolf import rules, rundir
from pgolf.artifact.load import load_artifact_model
from pgolf.audit import probes
from pgolf.config import RunConfig
from pgolf.data.dataset import resolve_dataset
from pgolf.data.shards import load_tokens
from pgolf.data.tokenizer import build_byte_tables, load_tokenizer
from pgolf.dist import World
from pgolf.eval.bpb import TorchByteTables
from pgolf.eval.evaluate import batch_windows, eval_window_length
from pgolf.eval.normalisation import normalisation_probe
from pgolf.eval.windows import build_tiling
from pgolf.rules import FAIL, PASS, passed, verdict


# -- records -------------------------------------------------------------------------------
def check_artifact(run_dir: Path, cfg: RunConfig, report: dict) -> dict:
    """The byte rule on the artifact on disk and the script an export would ship; a report
    whose byte figures differ from those fails too (it would misstate the submission)."""
    artifact = run_dir / rundir.ARTIFACT
    if not artifact.is_file():
        return verdict("artifact_under_16mb", FAIL, f"{artifact} missing")
    bytes_code, _ = rules.shipped_code_bytes(cfg.to_dict())
    result = rules.artifact_size(bytes_code, artifact.stat().st_size)
    measured = result["evidence"]
    stale = [k for k in ("bytes_code", "bytes_model") if report.get(k) != measured[k]]
    if stale:
        result["status"] = FAIL
        said = ", ".join(f"{k} {report.get(k)}" for k in stale)
        result["detail"] += f"; report.json says {said} (stale report)"
    measured["report_bytes_total"] = report.get("bytes_total")
    return result


def check_coverage(cfg: RunConfig, report: dict, val_tokens: np.ndarray) -> dict:
    """Coverage against the full validation stream, tiled again here."""
    ev = cfg.eval
    seq_len = eval_window_length(ev, cfg.train.train_seq_len)
    tiling = build_tiling(val_tokens, seq_len, ev.eval_mode, ev.eval_stride, ev.per_document_reset)
    cut = ev.max_val_tokens and ev.max_val_tokens < len(val_tokens)
    return rules.coverage(
        int(report.get("val_tokens", -1)),
        tiling.num_scored,
        f"eval.max_val_tokens={ev.max_val_tokens} cut the stream" if cut else None,
    )


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
    return load_artifact_model(run_dir / rundir.ARTIFACT, cfg.model, device)


def check_probes(
    run_dir: Path, cfg: RunConfig, report: dict, val_tokens: np.ndarray, tables, world: World
) -> list[dict]:
    model = load_probe_model(run_dir, cfg, world.device)
    seq_len = eval_window_length(cfg.eval, cfg.train.train_seq_len)
    ev = cfg.eval
    torch_tables = TorchByteTables(tables, world.device)
    vocab = cfg.model.vocab_size
    c1 = probes.causality_probe(model, val_tokens, seq_len, ev.temperature, vocab, world.device)
    c2 = normalisation_probe(model, val_tokens, seq_len, ev.temperature, vocab, torch_tables, world)
    out = [verdict("c1_causality", passed(c1["ok"]), c1["detail"]), rules.normalisation(c2)]
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
        evidence = {k: v for k, v in poison.items() if k not in ("ok", "detail")}
        out.append(
            verdict("c3_score_before_update", passed(poison["ok"]), poison["detail"], **evidence)
        )
    return out


# -- the whole audit -----------------------------------------------------------------------
def audit_run(run_dir: Path, world: World | None = None) -> dict:
    run_dir = Path(run_dir)
    cfg, report = rundir.load_evaluated(run_dir)
    world = world or probe_world()
    files = resolve_dataset(cfg.data)
    val_tokens = np.asarray(load_tokens(files.val))
    tables = build_byte_tables(load_tokenizer(files.tokenizer), cfg.model.vocab_size)
    verdicts = [
        check_artifact(run_dir, cfg, report),
        *rules.recorded(report, cfg),
        check_coverage(cfg, report, val_tokens),
        rules.tokenizer_tables(report.get("byte_tables_sha256"), tables.sha256()),
        rules.no_late_optimisation(rundir.read_metrics(run_dir), report),
        *check_probes(run_dir, cfg, report, val_tokens, tables, world),
    ]
    return {
        "run": str(run_dir),
        "ok": all(v["status"] != FAIL for v in verdicts),
        "proven": all(v["status"] == PASS for v in verdicts),
        "verdicts": verdicts,
    }
