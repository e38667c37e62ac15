"""`pgolf audit`: verdicts from the run's records and from probes of the artifact model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pgolf import rules, rundir
from pgolf.audit import checks, probes
from pgolf.cli import main
from pgolf.data.shards import read_shard, write_shard
from pgolf.data.tokenizer import build_byte_tables, load_tokenizer
from pgolf.eval import normalisation
from pgolf.eval.bpb import TorchByteTables

TINY = [
    "--set", "model.num_layers=2", "--set", "model.model_dim=64",
    "--set", "model.num_heads=4", "--set", "model.num_kv_heads=2",
    "--set", "train.train_seq_len=64", "--set", "train.train_batch_tokens=1024",
    "--set", "train.iterations=3", "--set", "train.warmdown_iters=1",
    "--set", "train.warmup_steps=0", "--set", "train.max_wallclock_seconds=0",
]  # fmt: skip
LEGAL_TTT = [
    "--set", "eval.ttt_enabled=true", "--set", "eval.ttt_chunk_tokens=512",
    "--set", "eval.ttt_epochs=1", "--set", "eval.ttt_batch_seqs=8",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_data(tiny_dataset, tmp_path_factory):
    """tiny_dataset with a 2,049-token validation shard, so full-coverage runs take seconds."""
    out = tmp_path_factory.mktemp("audit_data")
    for f in tiny_dataset.iterdir():
        if "_val_" not in f.name:
            shutil.copy(f, out / f.name)
    tokens = np.asarray(read_shard(tiny_dataset / "fineweb_val_000000.bin"))
    write_shard(out / "fineweb_val_000000.bin", tokens[:2049])
    return out


def _pgolf(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _run(small_data, out, extra, capsys, allow_illegal=False):
    args = ["run", "--preset", "baseline", "--data", str(small_data), "--out", str(out), "--json",
            *TINY, *extra]  # fmt: skip
    code, _, err = _pgolf(args + (["--allow-illegal"] if allow_illegal else []), capsys)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def legal_run(small_data, tmp_path_factory):
    capsys = _NullCapture()
    return _run(small_data, tmp_path_factory.mktemp("legal") / "run", LEGAL_TTT, capsys)


class _NullCapture:
    """Module fixtures cannot use capsys; main's prints are harmless there."""

    def readouterr(self):
        return "", ""


def _by_rule(result):
    return {v["rule"]: v for v in result["verdicts"]}


def test_audit_passes_a_legal_run_with_score_first_ttt(legal_run, capsys):
    code, out, err = _pgolf(["audit", str(legal_run), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    verdicts = _by_rule(result)
    assert result["ok"] is True
    for rule in ("artifact_under_16mb", "data_separation", "c1_causality", "normalisation",
                 "c3_score_before_update", "score_first", "scored_exactly_once",
                 "tokenizer_byte_tables", "full_validation_coverage", "temperature",
                 "no_late_optimisation"):  # fmt: skip
        assert verdicts[rule]["status"] == "pass", verdicts[rule]
    # CPU timings cannot prove the 8×H100 budget: a distinct status, not a silent pass
    assert verdicts["training_under_600s"]["status"] == "unproven"
    assert "does not prove the 8×H100 budget" in verdicts["eval_under_600s"]["detail"]
    assert "trained" in verdicts["c3_score_before_update"]["detail"]
    assert verdicts["c3_score_before_update"]["evidence"]["chunks_trained"] == 2
    report = json.loads((legal_run / "report.json").read_text())
    assert report["data_files"]["train"] and report["byte_tables_sha256"]
    size = (legal_run / "artifact.pgolf").stat().st_size
    assert verdicts["artifact_under_16mb"]["evidence"]["bytes_model"] == size
    # the audit runs the rules the run's own record was written from: the same verdicts
    for rule, entry in report["compliance"].items():
        assert entry["status"] == verdicts[rule]["status"], rule


def test_audit_fails_an_artifact_over_the_cap(legal_run, monkeypatch):
    cfg, report = rundir.load_evaluated(legal_run)
    assert checks.check_artifact(legal_run, cfg, report)["status"] == "pass"
    stale = checks.check_artifact(legal_run, cfg, {**report, "bytes_code": 1})
    assert stale["status"] == "fail" and "stale report" in stale["detail"]
    monkeypatch.setattr(rules, "BYTES_CAP", 100_000)
    verdict = checks.check_artifact(legal_run, cfg, report)
    assert verdict["status"] == "fail" and "100,000" in verdict["detail"]
    assert verdict["evidence"]["bytes_total"] > 100_000


def test_audit_fails_a_run_with_illegal_prequant_ttt(small_data, tmp_path, capsys):
    run = _run(
        small_data,
        tmp_path / "illegal",
        ["--set", "eval.prequant_ttt_enabled=true", "--set", "eval.prequant_ttt_epochs=1"],
        capsys,
        allow_illegal=True,
    )
    code, out, _ = _pgolf(["audit", str(run), "--json"], capsys)
    assert code == 1
    verdicts = _by_rule(json.loads(out))
    for rule in ("c3_score_before_update", "data_separation", "no_late_optimisation"):
        assert verdicts[rule]["status"] == "fail", rule
    assert verdicts["c1_causality"]["status"] == "pass"  # the model itself is still causal


def test_audit_fails_a_changed_tokenizer_and_a_partial_score(legal_run):
    cfg, tokens, tables = _probe_inputs(legal_run)
    _, report = rundir.load_evaluated(legal_run)
    rebuilt = tables.sha256()
    assert rules.tokenizer_tables(report["byte_tables_sha256"], rebuilt)["status"] == "pass"
    assert checks.check_coverage(cfg, report, tokens)["status"] == "pass"
    assert rules.tokenizer_tables("0" * 64, rebuilt)["status"] == "fail"
    assert rules.tokenizer_tables(None, rebuilt)["status"] == "unproven"
    fewer = {**report, "val_tokens": report["val_tokens"] - 64}
    assert checks.check_coverage(cfg, fewer, tokens)["status"] == "fail"


class _PeeksAhead(torch.nn.Module):
    """Adds a function of the whole sequence (future tokens included) to every position."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, logits_from=0):  # the scorer asks for the scored positions only
        logits = self.inner(x, logits_from=logits_from)
        peek = torch.zeros_like(logits)
        peek[..., 0] = 0.01 * x.float().mean(dim=1)[:, None]  # one logit: softmax is not shift-free
        return logits + peek


def _probe_inputs(run):
    cfg, _ = rundir.load_evaluated(run)
    files = checks.resolve_dataset(cfg.data)
    tokens = np.asarray(checks.load_tokens(files.val))
    tables = build_byte_tables(load_tokenizer(files.tokenizer), cfg.model.vocab_size)
    return cfg, tokens, tables


def test_causality_probe_catches_a_model_that_reads_future_tokens(legal_run, monkeypatch):
    cfg, tokens, _ = _probe_inputs(legal_run)
    model = checks.load_probe_model(legal_run, cfg, torch.device("cpu"))
    honest = probes.causality_probe(model, tokens, 64, 1.0, 1024, torch.device("cpu"))
    assert honest["ok"] and honest["max_past_shift"] == 0.0
    cheat = probes.causality_probe(_PeeksAhead(model), tokens, 64, 1.0, 1024, torch.device("cpu"))
    assert not cheat["ok"] and cheat["max_past_shift"] > probes.CAUSAL_TOL
    # and through the whole audit, via the loader the audit uses
    monkeypatch.setattr(checks, "load_probe_model", lambda *a: _PeeksAhead(model))
    verdicts = {v["rule"]: v for v in checks.check_probes(
        legal_run, cfg, {}, tokens, _probe_inputs(legal_run)[2], checks.probe_world()
    )[:2]}  # fmt: skip
    assert verdicts["c1_causality"]["status"] == "fail"


def test_normalisation_probe_catches_a_distribution_that_does_not_sum_to_one(
    legal_run, monkeypatch
):
    cfg, tokens, tables = _probe_inputs(legal_run)
    world = checks.probe_world()
    model = checks.load_probe_model(legal_run, cfg, world.device)
    args = (model, tokens, 64, 1.0, 1024, TorchByteTables(tables), world)
    assert normalisation.normalisation_probe(*args)["ok"]

    def target_only(logits, targets, temperature):  # a raw logit read as a log-probability
        return -(logits / temperature).gather(-1, targets[:, None])[:, 0]

    monkeypatch.setattr(normalisation, "scored_nll", target_only)
    result = normalisation.normalisation_probe(*args)
    assert not result["ok"] and result["max_mass_error"] > 1e-3
    assert rules.normalisation(result)["status"] == "fail"


def test_audit_bad_input_exits_2(tmp_path, capsys):
    code, _, err = _pgolf(["audit", str(tmp_path / "nope")], capsys)
    assert code == 2 and "not found" in err
    (tmp_path / "half").mkdir()
    code, _, err = _pgolf(["audit", str(tmp_path / "half")], capsys)
    assert code == 2 and "config.json" in err


def test_poison_probe_catches_ttt_that_adapts_on_future_chunks(legal_run, monkeypatch):
    cfg, tokens, tables = _probe_inputs(legal_run)
    world = checks.probe_world()
    model = checks.load_probe_model(legal_run, cfg, world.device)
    args = (model, tokens, cfg.eval, 64, TorchByteTables(tables), world, 8)
    assert probes.poison_probe(*args)["ok"]
    honest_ttt = probes.score_first_ttt

    def adapts_on_everything_first(model, stream, *a, **k):
        # the illegal pattern: an update that has seen the whole stream before any scoring
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * float(np.asarray(stream).sum() % 97))
        return honest_ttt(model, stream, *a, **k)

    monkeypatch.setattr(probes, "score_first_ttt", adapts_on_everything_first)
    result = probes.poison_probe(*args)
    assert not result["ok"] and result["prefix_shift_nats"] > 0


def test_timings_pass_or_fail_only_on_8_gpus_and_are_unproven_elsewhere_even_over_the_cap():
    def statuses(device, world_size, seconds):
        report = {"device": device, "world_size": world_size, "train_time_s": seconds}
        report["eval_time_s"] = seconds
        return (rules.training_time(report)["status"], rules.eval_time(report)["status"])

    assert statuses("cuda:0", 8, 590.0) == ("pass", "pass")
    assert statuses("cuda:0", 8, 700.0) == ("fail", "fail")
    for device, world_size in (("cpu", 1), ("cuda:0", 1), ("cpu", 8)):
        for seconds in (6.5, 700.0):
            assert set(statuses(device, world_size, seconds)) == {"unproven"}
    calibrated = {"device": "cuda:0", "world_size": 8, "train_time_s": 590.0, "eval_time_s": 1.0,
                  "calib_time_s": 14.0, "calibration": {"calib_source": "train"}}  # fmt: skip
    assert rules.training_time(calibrated)["status"] == "fail"  # SPEC §1.3
