"""The command line: one-line errors with exit code 2, --json output, and `pgolf run` end to end."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pgolf.cli import main
from pgolf.data.shards import read_shard, write_shard
from pgolf.data.tokenizer import file_sha256
from pgolf.settings import shared_data

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


def _one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def _copy_dataset(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


@pytest.mark.parametrize("vocab", [512, 4096])
def test_a_model_vocabulary_other_than_the_tokenizers_is_refused_naming_the_override(
    vocab, tiny_dataset, tmp_path, capsys
):
    run = tmp_path / "r"
    code, _, err = _run_cli(
        ["run", "--preset", "baseline", "--data", str(tiny_dataset), "--out", str(run),
         *TINY, "--set", f"model.vocab_size={vocab}"],
        capsys,
    )  # fmt: skip
    _one_line_error(code, err, f"model.vocab_size={vocab}", "has 1024 pieces",
                    "--allow-tokenizer-mismatch")  # fmt: skip
    assert not run.exists()


def test_a_tokenizer_other_than_the_one_meta_json_records_is_refused_by_inspect_and_run(
    tiny_dataset, tmp_path, capsys, official_tokenizer_path
):
    data = _copy_dataset(tiny_dataset, tmp_path / "sp1024")
    recorded = {"file": "tokenizer.model", "sha256": file_sha256(official_tokenizer_path)}
    (data / "meta.json").write_text(json.dumps({"tokenizer": recorded}))
    sp4096 = shared_data("tokenizers", "fineweb_4096_bpe.model")
    inspect = ["data", "inspect", str(data), "--tokenizer", str(sp4096), "--json"]
    code, _, err = _run_cli(inspect, capsys)
    _one_line_error(code, err, str(sp4096), str(data / "meta.json"), "--allow-tokenizer-mismatch")
    code, out, err = _run_cli([*inspect, "--allow-tokenizer-mismatch"], capsys)
    assert code == 0 and json.loads(out)["tokenizer"]["vocab_size"] == 4096
    run = tmp_path / "run"
    code, _, err = _run_cli(
        ["run", "--preset", "baseline", "--data", str(data), "--out", str(run), *TINY,
         "--set", f"data.tokenizer={sp4096}", "--set", "model.vocab_size=4096"],
        capsys,
    )  # fmt: skip
    _one_line_error(code, err, str(sp4096), "meta.json", "--allow-tokenizer-mismatch")
    assert not run.exists()


def test_a_corrupt_train_shard_is_refused_before_training_naming_the_file_and_offset(
    tiny_dataset, tmp_path, capsys
):
    """The bad id sits where a short run's loader never reads: found up front, not mid-run."""
    data = _copy_dataset(tiny_dataset, tmp_path / "data")
    shard = data / "fineweb_train_000001.bin"
    tokens = np.array(read_shard(shard))
    tokens[150_000] = 1500
    write_shard(shard, tokens)
    run = tmp_path / "run"
    code, _, err = _run_cli(
        ["run", "--preset", "baseline", "--data", str(data), "--out", str(run), *TINY], capsys
    )
    _one_line_error(code, err, f"{shard}: token id 1500 at token 150,000", "model.vocab_size=1024")
    assert not run.exists()


def test_a_run_that_fails_to_start_leaves_nothing_that_blocks_the_retry(
    tiny_dataset, tmp_path, capsys
):
    nested = tmp_path / "runs" / "a"
    bad = ["--set", "train.train_batch_tokens=1000"]  # caught when the trainer is built
    code, _, err = _run_cli(
        ["run", "--preset", "baseline", "--data", str(tiny_dataset), "--out", str(nested),
         *TINY, *bad],
        capsys,
    )  # fmt: skip
    _one_line_error(code, err, "train.train_batch_tokens=1000")
    assert not (tmp_path / "runs").exists()  # the directories it made are gone too
    mine = tmp_path / "mine"
    mine.mkdir()
    args = ["run", "--preset", "baseline", "--data", str(tiny_dataset), "--out", str(mine), *TINY]
    code, _, err = _run_cli([*args, *bad], capsys)
    assert code == 2 and list(mine.iterdir()) == []  # a directory the user made stays
    code, _, err = _run_cli(args, capsys)
    assert code == 0, err
    assert (mine / "report.json").is_file()


@pytest.mark.parametrize("command", ["run", "data build"])
def test_an_unwritable_out_is_one_line_and_exit_2(command, tiny_dataset, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "out"
    if command == "run":
        args = ["run", "--preset", "baseline", "--data", str(tiny_dataset), *TINY]
    else:
        text = tmp_path / "doc.txt"
        text.write_text("one small document\n")
        args = ["data", "build", "--input", str(text), "--vocab-size", "300"]
    before = sorted(tmp_path.iterdir())
    code, _, err = _run_cli([*args, "--out", str(out)], capsys)
    # run names OUT, build the folder it builds in beside OUT: both the file in the way
    _one_line_error(code, err, str(blocker), "cannot write a directory here", "another --out")
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_out_is_one_line_and_exit_2(tiny_dataset, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    out = locked / "run"
    code, _, err = _run_cli(
        ["run", "--preset", "baseline", "--data", str(tiny_dataset), "--out", str(out), *TINY],
        capsys,
    )
    _one_line_error(code, err, f"{out}: cannot write a directory here (Permission denied)")


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


def test_mixed_gptq_quantize_end_to_end(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "mixed"
    code, out, err = _run_cli(
        ["run", "--preset", "baseline", "--data", str(tiny_dataset), "--out", str(run), "--json",
         *TINY, "--set", "quant.codec=mixed", "--set", "quant.calib_batches=2",
         "--set", "quant.keep_float_max_numel=1024", "--set", "quant.compressor=rans"],
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
    # No declared script size: the fit budgets for the shipped script and says so, in both
    # places; rANS stores no float16, so those sections' switch to `auto` is stated too.
    quant, log = report["quant"], (run / "train.log").read_text()
    assert quant["code_bytes_source"] == "the shipped train_gpt.py"
    assert quant["target_bytes"] == 16_000_000 - quant["code_bytes"]
    # One bytes_code, to the byte: the run's, the fit target's, the audit's and the export's
    from pgolf.audit.checks import check_artifact
    from pgolf.rundir import load_evaluated

    audited = check_artifact(run, *load_evaluated(run))
    assert audited["status"] == "pass", audited["detail"]
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    sub = json.loads((tmp_path / "export" / "submission.json").read_text())
    shipped = (tmp_path / "export" / "train_gpt.py").stat().st_size
    assert report["bytes_code"] == quant["code_bytes"] == shipped
    assert audited["evidence"]["bytes_code"] == sub["bytes_code"] == shipped
    assert report["bytes_total"] == sub["bytes_total"] == audited["evidence"]["bytes_total"]
    assert f"({quant['code_bytes_source']})" in log
    assert quant["codec_switched"]["from"] == "rans" and "codec switched rans → auto" in log


def test_the_summary_names_the_codec_and_mode_that_made_the_headline_score():
    from pgolf.run import summary_rows

    rows = dict(summary_rows({"codec": "mixed", "eval_mode": "sliding", "ttt": {"chunks": 3}}))
    assert "val_bpb (mixed, sliding + TTT)" in rows
    rows = dict(summary_rows({"codec": "int8-zlib", "eval_mode": "nonoverlapping", "ttt": None}))
    assert "val_bpb (int8-zlib, nonoverlapping)" in rows


def test_a_stage_says_what_to_run_next_and_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import argparse

    from pgolf.cli import presets, stages
    from pgolf.train.trainer import TrainingInterrupted

    args = argparse.Namespace(run=str(tmp_path), json=True)
    stages.run_stage(args, lambda run, world: {"steps": 3}, then=f"pgolf eval {tmp_path}")
    out, err = capsys.readouterr()
    assert json.loads(out) == {"steps": 3} and err == f"next: pgolf eval {tmp_path}\n"

    def interrupted(args):
        raise TrainingInterrupted(f"stopped at step 5; pgolf train {tmp_path} --resume")

    monkeypatch.setattr(presets, "cmd_presets", interrupted)  # any command: main handles Ctrl-C
    assert main(["presets"]) == 130
    assert capsys.readouterr().err == (
        f"pgolf: interrupted: stopped at step 5; pgolf train {tmp_path} --resume\n"
    )


def _name_worker(rank, world_size, port, out_dir):
    from datetime import datetime

    from pgolf.cli.stages import default_run_dir
    from pgolf.dist import shutdown
    from tests.conftest import join_cpu_world

    world = join_cpu_world(rank, world_size, port)
    # Rank 1's clock has already crossed into the next second.
    now = datetime(2026, 1, 1, 12, 0, 59) if rank == 0 else datetime(2026, 1, 1, 12, 1, 0)
    (out_dir / f"name{rank}").write_text(str(default_run_dir("demo", world, now=lambda: now)))
    shutdown(world)


def test_torchrun_ranks_agree_on_the_default_run_folder(tmp_path):
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    mp.spawn(_name_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    names = {(tmp_path / f"name{rank}").read_text() for rank in range(2)}
    assert names == {str(Path("runs") / "demo_20260101_120059")}


@pytest.mark.parametrize("extra", [[], ["--allow-tokenizer-mismatch"]])
def test_run_demo_with_data_trains_on_that_data_and_never_builds_the_demo_set(
    extra, tiny_dataset, tmp_path, capsys, monkeypatch
):
    from pgolf.cli import stages

    def refuse(world):
        raise AssertionError("the demo dataset was built although --data was given")

    monkeypatch.setattr(stages, "ensure_demo_data", refuse)
    run = tmp_path / "run"
    args = ["run", "--preset", "demo", "--data", str(tiny_dataset), "--out", str(run), *extra]
    code, _, _ = _run_cli([*args, "--json", *TINY], capsys)
    assert code == 0
    assert json.loads((run / "config.json").read_text())["data"]["path"] == str(tiny_dataset)
