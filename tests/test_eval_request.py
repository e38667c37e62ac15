"""`pgolf eval RUN --stride/--eval-len/--ttt/--val/--set`: other settings, recorded beside the
run's own score; the headline changes only under the run's own settings."""

import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from pgolf.cli import main
from pgolf.data.shards import read_shard, write_shard
from pgolf.dist import init_world
from pgolf.observe.runs import load_run
from pgolf.run import run_pipeline
from tests.conftest import DEV_SHARD, tiny_config

HEADLINE = ("val_bpb", "val_loss", "val_tokens", "val_bytes", "eval_mode", "ttt", "compliance")


@pytest.fixture(scope="module")
def trained_run(tiny_dataset, tmp_path_factory, monkeypatch_module):
    """One tiny baseline run (non-overlapping T=64, no TTT) that every test copies."""
    run = tmp_path_factory.mktemp("reeval") / "run"
    run_pipeline(run, tiny_config(tiny_dataset), init_world(), echo=False)
    return run


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGOLF_DEVICE", "cpu")
        yield mp


@pytest.fixture
def run(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def _eval(run, *flags, capsys):
    code = main(["eval", str(run), "--json", *flags])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _report(run) -> dict:
    return json.loads((run / "report.json").read_text())


def _expected_bytes(tokens: np.ndarray, tokenizer_path, targets: int) -> int:
    """SPEC §3.1–3.2 straight from the tokenizer's pieces, for targets 1 … `targets`."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))

    def boundary(i: int) -> bool:
        return sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)

    total = 0
    for prev, y in zip(tokens[:targets].tolist(), tokens[1 : targets + 1].tolist(), strict=True):
        if boundary(y):
            continue
        if sp.is_byte(y):
            total += 1
            continue
        piece = sp.id_to_piece(y)
        total += len(piece.removeprefix("▁").encode("utf-8"))
        total += piece.startswith("▁") and not boundary(prev)
    return total


def test_another_validation_set_scores_exactly_its_targets_and_bytes(
    run, tiny_dataset, tmp_path, capsys
):
    tokens = np.asarray(read_shard(DEV_SHARD))[-43_001:-40_000]  # not the run's val tokens
    val = tmp_path / "other_val"
    val.mkdir()
    write_shard(val / "fineweb_val_000000.bin", tokens[:1000])
    write_shard(val / "fineweb_val_000001.bin", tokens[1000:])
    n, window = len(tokens) - 1, 64
    before = _report(run)

    plain = _eval(run, "--val", str(val / "fineweb_val_*.bin"), capsys=capsys)
    scored = n // window * window  # non-overlapping drops the tail short of a window (§3.5)
    assert plain["val_tokens"] == scored == 2944
    assert plain["val_bytes"] == _expected_bytes(tokens, tiny_dataset / "tokenizer.model", scored)
    assert plain["val_files"] == [str(p.resolve()) for p in sorted(val.glob("*.bin"))]
    assert plain["settings"] == {} and plain["request"] == {"val": str(val / "fineweb_val_*.bin")}

    sliding = _eval(run, "--val", str(val), "--stride", "16", capsys=capsys)
    assert sliding["val_tokens"] == n  # the corrected sliding tiling scores every target once
    assert sliding["val_bytes"] == _expected_bytes(tokens, tiny_dataset / "tokenizer.model", n)
    assert sliding["compliance"]["scored_exactly_once"]["ok"] is True
    assert sliding["compliance"]["full_validation_coverage"]["ok"] is True

    after = _report(run)
    assert [e["evaluation"] for e in after["evaluations"]] == [1, 2]
    assert {k: after[k] for k in HEADLINE} == {k: before[k] for k in HEADLINE}


def test_a_stride_is_recorded_beside_the_headline_and_the_own_settings_refresh_it(run, capsys):
    before = _report(run)
    result = _eval(run, "--stride", "16", capsys=capsys)
    assert result["settings"] == {"eval_mode": "sliding", "eval_stride": 16}
    assert result["eval_mode"] == "sliding" and result["eval_stride"] == 16
    assert result["val_tokens"] == 4096  # the run's 4,097-token cap: every target, none trimmed
    assert result["val_bpb"] != before["val_bpb"]  # more context per target: another score
    after = _report(run)
    assert after["evaluations"] == [result]
    assert {k: after[k] for k in HEADLINE} == {k: before[k] for k in HEADLINE}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["evaluation"] == 1 and records[-1]["eval_mode"] == "sliding"
    assert records[-1]["val_bpb"] == result["val_bpb"]
    # `pgolf compare` / `plot` show the run's own scores only
    assert load_run(run).bpb_by_mode() == {
        "pre_quant": before["pre_quant_val_bpb"],
        "nonoverlapping": before["val_bpb"],
    }

    # Flags that name the run's own settings are the run's evaluation: the headline, no entry.
    own = _eval(run, "--set", "eval.eval_mode=nonoverlapping", "--eval-len", "64", capsys=capsys)
    assert "evaluation" not in own and own["val_bpb"] == before["val_bpb"]
    assert _report(run)["evaluations"] == [result]


def _check_ttt_ledger(result: dict) -> None:
    ttt, rules = result["ttt"], result["compliance"]
    assert rules["score_first"]["ok"] is True
    assert "last chunk not trained" in rules["score_first"]["detail"]
    assert rules["scored_exactly_once"]["ok"] is True
    assert result["val_tokens"] == 4096  # every target of the (capped) stream, once
    assert ttt["num_chunks"] == ttt["chunks_scored"] == 4  # 4,096 targets / 1,024
    assert ttt["chunks_trained"] == 3  # the last chunk is scored, never trained on
    assert ttt["bpb_after"] == result["val_bpb"]  # s_0: the first-pass score is the one reported


def test_ttt_can_be_turned_on_from_a_preset_and_off_again(run, capsys):
    before = _report(run)
    on = _eval(run, "--ttt", "seed-p610", "--set", "eval.ttt_chunk_tokens=1024", capsys=capsys)
    assert on["settings"]["ttt_enabled"] is True and on["settings"]["ttt_freeze_blocks"] == 2
    assert on["request"] == {"ttt": "seed-p610", "assignments": ["eval.ttt_chunk_tokens=1024"]}
    _check_ttt_ledger(on)
    assert {k: _report(run)[k] for k in HEADLINE} == {k: before[k] for k in HEADLINE}

    # A TTT run: its config as `pgolf run --set eval.ttt_enabled=true …` writes it.
    config = json.loads((run / "config.json").read_text())
    config["eval"].update(ttt_enabled=True, ttt_chunk_tokens=1024)
    (run / "config.json").write_text(json.dumps(config))
    headline = _eval(run, capsys=capsys)
    _check_ttt_ledger(headline)
    assert _report(run)["val_bpb"] == headline["val_bpb"] != before["val_bpb"]

    off = _eval(run, "--ttt", "off", capsys=capsys)
    assert off["settings"] == {"ttt_enabled": False} and off["ttt"] is None
    assert off["val_bpb"] == pytest.approx(before["val_bpb"], abs=1e-9)  # the plain score again
    assert off["compliance"]["score_first"]["detail"] == "no test-time training"
    report = _report(run)
    assert report["val_bpb"] == headline["val_bpb"] and report["ttt"] == headline["ttt"]
    assert [e["evaluation"] for e in report["evaluations"]] == [1, 2]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--stride", "0"], "--stride 0: expected a positive number of tokens"),
        (["--stride", "-3"], "--stride -3: expected a positive"),
        (["--stride", "65"], "expected --stride at most 64"),
        (["--eval-len", "0"], "--eval-len 0: expected a positive window length"),
        (["--ttt", "nope"], "--ttt 'nope': expected off or a preset name"),
        (["--ttt", "baseline"], "--ttt baseline: that preset has no test-time training"),
        (["--val", "/nonexistent/fineweb_val_*.bin"], "--val /nonexistent/fineweb_val_*.bin: no"),
        (["--set", "model.num_layers=3"], "pgolf eval changes only eval.* settings"),
        (["--set", "eval.bogus=1"], "unknown key eval.bogus"),
        (["--set", "eval.ttt_epochs=-1"], "eval.ttt_epochs must be ≥ 0"),
    ],
)
def test_bad_flags_are_one_line_exit_2_and_leave_the_run_as_it_was(run, flags, message, capsys):
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code = main(["eval", str(run), *flags])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files


def test_the_tokenizer_check_applies_to_another_validation_set(run, tiny_dataset, tmp_path, capsys):
    val = tmp_path / "foreign"
    val.mkdir()
    shutil.copy(tiny_dataset / "fineweb_val_000000.bin", val)
    (val / "meta.json").write_text(json.dumps({"tokenizer": {"sha256": "0" * 64}}))
    report = (run / "report.json").read_bytes()
    code = main(["eval", str(run), "--val", str(val)])
    _, err = capsys.readouterr()
    assert code == 2 and "not the tokenizer the shards in" in err and str(val) in err
    assert (run / "report.json").read_bytes() == report
