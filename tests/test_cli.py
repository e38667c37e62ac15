"""The command line: one-line errors with exit code 2, --json output, and `pgolf run` end to end."""

import json
import subprocess
import sys

import pytest

from pgolf.cli import main
from pgolf.data.shards import write_shard

TINY = [
    "--set", "model.num_layers=2", "--set", "model.model_dim=64",
    "--set", "model.num_heads=4", "--set", "model.num_kv_heads=2",
    "--set", "train.train_seq_len=64", "--set", "train.train_batch_tokens=1024",
    "--set", "train.iterations=6", "--set", "train.warmdown_iters=2",
    "--set", "train.warmup_steps=0", "--set", "train.max_wallclock_seconds=0",
    "--set", "eval.max_val_tokens=4097",
]  # fmt: skip


def _run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "pgolf", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("pgolf ")
    for command in (["data", "build"], ["run"], ["train"], ["eval"], ["presets"]):
        with pytest.raises(SystemExit) as exc:
            main([*command, "--help"])
        assert exc.value.code == 0


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["run", "--preset", "nope"], "unknown preset 'nope'"),
        (["run", "--preset", "baseline", "--set", "model.bogus=1"], "unknown key model.bogus"),
        (["run", "--preset", "baseline", "--set", "train.iterations=0"], "budget is 0"),
        (["run", "--preset", "baseline"], "no dataset"),
        (["data", "inspect", "/nonexistent/shard.bin"], "/nonexistent/shard.bin"),
        (["train", "/nonexistent/run"], "not a run directory"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_code_2(args, fragment, capsys, monkeypatch):
    monkeypatch.setenv("PGOLF_DEVICE", "cpu")
    code, out, err = _run_cli(args, capsys)
    assert code == 2
    assert fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_dataset_whose_vocabulary_exceeds_the_model_is_refused(tiny_dataset, tmp_path, capsys):
    code, _, err = _run_cli(
        ["run", "--preset", "baseline", "--data", str(tiny_dataset), "--out", str(tmp_path / "r"),
         *TINY, "--set", "model.vocab_size=512"],
        capsys,
    )  # fmt: skip
    assert code == 2 and "larger than the model's model.vocab_size=512" in err


def test_shards_with_ids_outside_the_tokenizer_are_refused(tiny_dataset, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_dataset.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    write_shard(bad / "fineweb_val_000000.bin", [1, 5, 2000, 7])
    code, _, err = _run_cli(["data", "inspect", str(bad)], capsys)
    assert code == 2 and "2000" in err


def test_run_end_to_end_writes_the_run_directory_and_an_honest_report(
    tiny_dataset, tmp_path, capsys
):
    run = tmp_path / "run"
    code, out, err = _run_cli(
        ["run", "--preset", "baseline", "--data", str(tiny_dataset), "--out", str(run),
         "--json", *TINY],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    for name in ("config.json", "train.log", "metrics.jsonl", "model.safetensors",
                 "artifact.pgolf", "report.json", "checkpoint"):  # fmt: skip
        assert (run / name).exists(), name
    assert report == json.loads((run / "report.json").read_text())
    for key in ("val_bpb", "val_loss", "val_tokens", "val_bytes", "pre_quant_val_bpb",
                "bytes_model", "bytes_code", "bytes_total", "train_time_s", "calib_time_s",
                "eval_time_s", "ttt", "steps", "seed", "world_size", "device", "compliance",
                "pgolf_version", "config_sha256", "codec"):  # fmt: skip
        assert key in report, key
    assert report["codec"] == "int8-zlib"
    assert report["steps"] == 6 and report["val_tokens"] == 4096
    assert report["bytes_total"] == report["bytes_code"] + report["bytes_model"]
    assert report["bytes_model"] == (run / "artifact.pgolf").stat().st_size
    assert 3.0 < report["val_bpb"] < 5.0  # barely trained sp1024 model
    assert abs(report["val_bpb"] - report["pre_quant_val_bpb"]) < 0.05
    assert report["compliance"]["artifact_under_16mb"]["ok"] is True
    assert report["compliance"]["full_validation_coverage"]["ok"] is False
    assert report["compliance"]["score_first"]["ok"] is True
    assert (
        "does not prove the 8×H100 budget" in report["compliance"]["training_under_600s"]["detail"]
    )
    log = (run / "train.log").read_text()
    assert log.startswith("pgolf ") and "code_sha256" in log and '"num_layers": 2' in log

    # a second run into the same directory is refused; eval alone re-scores the artifact
    code, _, err = _run_cli(["run", "--preset", "baseline", "--data", str(tiny_dataset),
                             "--out", str(run), *TINY], capsys)  # fmt: skip
    assert code == 2 and "already exists" in err
    code, out, _ = _run_cli(["eval", str(run), "--json"], capsys)
    assert code == 0 and json.loads(out)["val_bpb"] == report["val_bpb"]


def test_mixed_gptq_export_end_to_end(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "mixed"
    code, out, err = _run_cli(
        ["run", "--preset", "baseline", "--data", str(tiny_dataset), "--out", str(run), "--json",
         *TINY, "--set", "export.codec=mixed", "--set", "export.calib_batches=2",
         "--set", "export.keep_float_max_numel=1024", "--set", "export.compressor=rans"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["calib_time_s"] > 0 and report["calibration"]["calib_source"] == "train"
    assert report["codec"] == "mixed"
    assert report["quant"]["gptq_fallbacks"] == {}
    assert (run / "quant_report.json").is_file()
    assert report["bytes_model"] == (run / "artifact.pgolf").stat().st_size
    # int6 GPTQ of a 2-layer model: smaller than the int8 artifact, and still close to float
    assert abs(report["val_bpb"] - report["pre_quant_val_bpb"]) < 0.1
    assert "calibration" in report["compliance"]["training_under_600s"]["detail"]


def test_the_summary_names_the_codec_and_mode_that_made_the_headline_score():
    from pgolf.run import summary_rows

    rows = dict(summary_rows({"codec": "mixed", "eval_mode": "sliding", "ttt": {"chunks": 3}}))
    assert "val_bpb (mixed, sliding + TTT)" in rows
    rows = dict(summary_rows({"codec": "int8-zlib", "eval_mode": "nonoverlapping", "ttt": None}))
    assert "val_bpb (int8-zlib, nonoverlapping)" in rows
