"""pgolf.rules: every rule passes on its evidence and fails (or stays unproven) without it;
pgolf.rundir: the run folder's records, readable without importing the pipeline."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pgolf import rules, rundir
from pgolf.config import load_preset
from pgolf.data.shards import write_shard
from pgolf.errors import PgolfError

PASS, FAIL, UNPROVEN = rules.PASS, rules.FAIL, rules.UNPROVEN


@pytest.mark.parametrize(
    "modules",
    [
        "pgolf.audit, pgolf.observe",
        "pgolf.cli",  # every command's wiring, `pgolf audit`'s and `pgolf plot`'s included
    ],
)
def test_audit_and_observe_read_runs_without_importing_the_pipeline(modules):
    check = (
        f"import {modules}, sys; "
        "assert 'pgolf.train' not in sys.modules and 'pgolf.run' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", check], check=True)


def test_the_commands_behind_them_import_no_training_either():
    check = (
        "import pgolf.audit.checks, pgolf.audit.compare, pgolf.export.submission, "
        "pgolf.observe.runs, pgolf.observe.plot, pgolf.observe.ablate, sys; "
        "assert 'pgolf.run' not in sys.modules and 'pgolf.train.trainer' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", check], check=True)


def test_the_byte_cap_is_decimal_and_counts_code_plus_model():
    assert rules.BYTES_CAP == 16_000_000 != 16 * 1024**2
    assert rules.artifact_size(100_000, 15_900_000)["status"] == PASS
    over = rules.artifact_size(100_000, 15_900_001)
    assert over["status"] == FAIL and over["evidence"]["bytes_total"] == 16_000_001


def test_score_first_fails_pre_quant_ttt_a_trained_last_chunk_and_a_rescore():
    ttt = {"chunks_scored": 4, "chunks_trained": 3, "bpb_after": 1.2}
    assert rules.score_first({"ttt": None})["status"] == PASS
    assert rules.score_first({"ttt": ttt, "val_bpb": 1.2})["status"] == PASS
    assert rules.score_first({"prequant_ttt": {"reason": "ILLEGAL"}})["status"] == FAIL
    trained_all = {**ttt, "chunks_trained": 4}
    assert rules.score_first({"ttt": trained_all, "val_bpb": 1.2})["status"] == FAIL
    assert rules.score_first({"ttt": ttt, "val_bpb": 1.1})["status"] == FAIL  # not s_0


def test_scored_once_and_coverage():
    assert rules.scored_once({"ledger_targets": 10, "val_tokens": 10})["status"] == PASS
    assert rules.scored_once({"ledger_targets": 9, "val_tokens": 10})["status"] == FAIL
    assert rules.scored_once({"val_tokens": 10})["status"] == UNPROVEN
    assert rules.coverage(10, 10)["status"] == PASS
    assert rules.coverage(9, 10)["status"] == FAIL
    assert rules.coverage(10, 10, "eval.max_val_tokens=64 cut the stream")["status"] == FAIL
    assert rules.coverage(10, None)["status"] == UNPROVEN


def test_temperature_is_one_or_fixed_before_training():
    cfg = load_preset("demo")
    trained = {"config_sha256": cfg.sha256(), "temperature": 1.0}
    assert rules.temperature(trained, cfg)["status"] == PASS
    assert rules.temperature({**trained, "temperature": 0.9}, cfg)["status"] == FAIL
    cfg.eval.temperature = 0.9
    fixed = {"config_sha256": cfg.sha256(), "temperature": 0.9}
    assert rules.temperature(fixed, cfg)["status"] == PASS
    assert rules.temperature({**fixed, "config_sha256": "changed"}, cfg)["status"] == FAIL


def test_normalisation_is_the_probes_verdict():
    assert rules.normalisation({"ok": True, "detail": "sums to 1"})["status"] == PASS
    assert rules.normalisation({"ok": False, "detail": "277"})["status"] == FAIL
    assert rules.normalisation(None)["status"] == UNPROVEN


def test_data_separation_catches_a_validation_shard_by_name_or_content(tmp_path):
    tokens = np.arange(3000, dtype=np.uint16)
    for name in ("fineweb_train_000000.bin", "fineweb_val_000000.bin", "copy.bin"):
        write_shard(tmp_path / name, tokens if name != "fineweb_train_000000.bin" else tokens[1:])
    train = str(tmp_path / "fineweb_train_000000.bin")
    val = str(tmp_path / "fineweb_val_000000.bin")
    report = {"data_files": {"train": [train], "val": [val]}}
    assert rules.data_separation(report)["status"] == PASS
    named = {"data_files": {"train": [train, val], "val": [val]}}
    assert rules.data_separation(named)["status"] == FAIL
    copied = {"data_files": {"train": [str(tmp_path / "copy.bin")], "val": [val]}}
    assert "same content" in rules.data_separation(copied)["detail"]
    assert rules.data_separation({})["status"] == UNPROVEN


def test_no_late_optimisation_allows_periodic_validation_but_not_steps_after_the_final_eval():
    report = {"steps": 2}
    records = [
        {"step": 1, "train_loss": 3.0},
        {"step": 1, "eval_mode": rundir.PERIODIC_EVAL, "val_loss": 3.1},
        {"step": 2, "train_loss": 2.9},
        {"step": 2, "eval_mode": "pre_quant", "val_bpb": 1.5},
    ]
    assert rules.no_late_optimisation(records, report)["status"] == PASS
    late = [*records, {"step": 3, "train_loss": 2.8}]
    verdict = rules.no_late_optimisation(late, report)
    assert verdict["status"] == FAIL and verdict["evidence"]["late_steps"] == [3, 3]


def test_compliance_names_every_rule_once_with_status_ok_and_evidence():
    cfg = load_preset("demo")
    report = {
        "bytes_code": 50_000, "bytes_model": 1_000_000, "val_tokens": 100,
        "ledger_targets": 100, "scorable_targets": 100, "temperature": 1.0,
        "config_sha256": cfg.sha256(), "ttt": None, "val_bpb": 1.5,
        "normalisation": {"ok": True, "detail": "sums to 1"},
    }  # fmt: skip
    record = rules.compliance(report, cfg)
    assert set(record) == {
        "artifact_under_16mb", "training_under_600s", "eval_under_600s", "data_separation",
        "score_first", "scored_exactly_once", "full_validation_coverage", "temperature",
        "normalisation",
    }  # fmt: skip
    assert record["artifact_under_16mb"]["ok"] is True
    assert record["training_under_600s"]["ok"] is None  # not recorded: unproven
    assert all(set(e) == {"status", "ok", "detail", "evidence"} for e in record.values())


def test_run_folder_records_round_trip_and_a_torn_metrics_line_is_dropped(tmp_path):
    assert rundir.read_report(tmp_path) == {} and rundir.read_metrics(tmp_path) == []
    assert rundir.update_report(tmp_path, write=False, a=1) == {"a": 1}
    assert not (tmp_path / rundir.REPORT).exists()  # only the main rank writes
    rundir.update_report(tmp_path, a=1)
    assert rundir.update_report(tmp_path, b=2) == {"a": 1, "b": 2} == rundir.read_report(tmp_path)
    (tmp_path / rundir.METRICS).write_text('{"step": 1}\n{"step": 2')
    assert rundir.read_metrics(tmp_path) == [{"step": 1}]
    (tmp_path / rundir.METRICS).write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(PgolfError, match=":1: not a JSON object"):
        rundir.read_metrics(tmp_path)
    with pytest.raises(PgolfError, match="no evaluated report.json"):
        rundir.write_json(tmp_path / rundir.CONFIG, load_preset("demo").to_dict())
        rundir.load_evaluated(tmp_path)


def test_a_config_json_with_a_retired_key_still_loads(tmp_path):
    config = load_preset("demo").to_dict()
    config["quant"]["code_measure"] = "imported"  # runs made before the key was retired
    (tmp_path / rundir.CONFIG).write_text(json.dumps(config))
    assert rundir.load_config(tmp_path).to_dict() == load_preset("demo").to_dict()
