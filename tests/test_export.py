"""`pgolf export`: the records folder, and a single-file train_gpt.py that reproduces the run."""

from __future__ import annotations

import base64
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pgolf.cli import main
from pgolf.data.shards import read_shard, write_shard

TINY = [
    "--set", "model.num_layers=2", "--set", "model.model_dim=64",
    "--set", "model.num_heads=4", "--set", "model.num_kv_heads=2",
    "--set", "train.train_seq_len=64", "--set", "train.train_batch_tokens=1024",
    "--set", "train.iterations=3", "--set", "train.warmdown_iters=1",
    "--set", "train.warmup_steps=0", "--set", "train.max_wallclock_seconds=0",
    "--set", "train.seed=7",
]  # fmt: skip
# Runs the exported script where only what a record needs can be imported (tqdm and safetensors
# raise ImportError), then proves every pgolf module came from the script itself. One torch
# thread, as in this process (conftest): a float sum split over more threads rounds differently.
CHECK = """
import runpy, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
for name in ("tqdm", "safetensors"):
    sys.modules[name] = None  # `import name` now raises ImportError
sys.argv = ["train_gpt.py"]
runpy.run_path("train_gpt.py", run_name="__main__")
me = str(Path("train_gpt.py").resolve())
foreign = [n for n, m in sys.modules.items()
           if n.split(".")[0] == "pgolf" and getattr(m, "__file__", None) != me]
assert not foreign, foreign
print("BUNDLE-ONLY", len([n for n in sys.modules if n.split(".")[0] == "pgolf"]))
"""


@pytest.fixture(scope="module")
def small_data(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_data")
    for f in tiny_dataset.iterdir():
        if "_val_" not in f.name:
            shutil.copy(f, out / f.name)
    tokens = np.asarray(read_shard(tiny_dataset / "fineweb_val_000000.bin"))
    write_shard(out / "fineweb_val_000000.bin", tokens[:2049])
    return out


@pytest.fixture(scope="module")
def seed_run(small_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("export_run") / "run"
    code = main(["run", "--preset", "baseline", "--data", str(small_data), "--out", str(run),
                 "--json", *TINY])  # fmt: skip
    assert code == 0
    return run


def test_export_writes_the_records_folder(seed_run, tmp_path, capsys):
    out = tmp_path / "2026-01-01_tiny"
    flags = ["--author", "Ada", "--github-id", "ada", "--name", "Tiny", "--blurb", "a test"]
    code = main(["export", str(seed_run), "--out", str(out), *flags, "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "requirements.txt", "submission.json", "train_gpt.py",
                     "train_seed7.log"]  # fmt: skip
    assert result["files"] == names
    sub = json.loads((out / "submission.json").read_text())
    report = json.loads((seed_run / "report.json").read_text())
    keys = "author date name github_id val_bpb blurb val_loss bytes_total bytes_code seeds"
    for key in (*keys.split(), "seed_results", "track", "compliance"):
        assert key in sub, key
    assert sub["author"] == "Ada" and sub["github_id"] == "ada" and sub["seeds"] == [7]
    assert sub["val_bpb"] == report["val_bpb"]
    assert sub["bytes_code"] == (out / "train_gpt.py").stat().st_size
    assert sub["bytes_total"] == sub["bytes_code"] + report["bytes_model"]
    assert sub["compliance"]["no_pre_quant_ttt"] is True
    assert sub["compliance"]["artifact_under_16mb"] is True
    assert sub["compliance"]["training_under_600s"] is None  # unproven: CPU timings prove nothing
    readme = (out / "README.md").read_text()
    assert "| 7 |" in readme and "artifact_under_16mb" in readme and "torchrun" in readme
    assert "| training_under_600s | unproven |" in readme
    assert "`model.num_layers`" in readme and "§5.2" in readme
    assert (out / "train_seed7.log").read_text() == (seed_run / "train.log").read_text()
    requirements = (out / "requirements.txt").read_text().splitlines()
    assert [r.split("==")[0].split(";")[0] for r in requirements] == [
        "numpy", "sentencepiece", "tomli", "torch"
    ]  # fmt: skip
    assert "import pgolf" not in (out / "train_gpt.py").read_text().split("SOURCES = {}")[0]


def test_export_refuses_an_existing_folder_without_force(seed_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(seed_run), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(["export", str(seed_run), "--out", str(out), "--force"]) == 0
    assert (out / "train_gpt.py").is_file() and (out / "notes.txt").read_text() == "mine"


def test_export_refuses_a_run_without_a_report(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "report" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_exported_script_alone_reproduces_the_run(seed_run, small_data, tmp_path):
    """Run the compressed form: it is the plain bundle behind an lzma+base85 stub (checked)."""
    plain, out = tmp_path / "plain", tmp_path / "sub"
    assert main(["export", str(seed_run), "--out", str(plain)]) == 0
    assert main(["export", str(seed_run), "--out", str(out), "--compress"]) == 0
    stub = (out / "train_gpt.py").read_text()
    payload = stub.split('b85decode("')[1].split('")')[0]
    source = lzma.decompress(base64.b85decode(payload)).decode()
    assert source == (plain / "train_gpt.py").read_text()
    assert len(stub) < len(source) / 2
    sub = json.loads((out / "submission.json").read_text())
    assert sub["bytes_code"] == (out / "train_gpt.py").stat().st_size
    shutil.copytree(small_data, out / "data")
    # -I: no PYTHONPATH, no user site, no cwd on sys.path; the script must carry pgolf itself
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PGOLF"))}
    env["PGOLF_DEVICE"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-I", "-c", CHECK], cwd=out, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BUNDLE-ONLY" in proc.stdout
    report = json.loads(Path(out / "run_seed7" / "report.json").read_text())
    original = json.loads((seed_run / "report.json").read_text())
    assert report["val_bpb"] == pytest.approx(original["val_bpb"], abs=1e-9)
    assert report["bytes_model"] == original["bytes_model"]
    # the script's own pipeline counts the script as its code bytes
    assert report["bytes_code"] == (out / "train_gpt.py").stat().st_size


def test_export_never_publishes_the_git_email_as_the_github_id(seed_run, tmp_path, monkeypatch):
    gitconfig = tmp_path / "gitconfig"
    gitconfig.write_text("[user]\n\tname = Ada L\n\temail = ada@example.com\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(gitconfig))
    out = tmp_path / "sub"
    assert main(["export", str(seed_run), "--out", str(out)]) == 0
    sub = json.loads((out / "submission.json").read_text())
    assert sub["github_id"] == "" and sub["author"] == "Ada L"
    assert "ada@example.com" not in "".join(p.read_text() for p in out.iterdir())


def test_export_into_an_unwritable_place_is_one_line_and_exit_2(seed_run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    assert main(["export", str(seed_run), "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write a directory here" in err and str(blocker) in err


def test_audit_report_and_export_agree_on_every_shared_verdict_and_figure(seed_run, tmp_path):
    from pgolf.audit.rules import audit_run
    from pgolf.audit.verdicts import REPORT_KEYS, UNPROVEN, ok_of

    audit = {v["rule"]: v for v in audit_run(seed_run)["verdicts"]}
    out = tmp_path / "export"
    assert main(["export", str(seed_run), "--out", str(out)]) == 0
    sub = json.loads((out / "submission.json").read_text())
    readme = (out / "README.md").read_text()
    report = json.loads((seed_run / "report.json").read_text())
    for rule, key in REPORT_KEYS.items():
        status = audit[rule]["status"]
        assert report["compliance"][key]["status"] == status, key
        assert report["compliance"][key]["ok"] is ok_of(status), key
        assert sub["compliance"][key] is ok_of(status), key
        assert f"| {key} | {status} |" in readme, key
    # CPU timings: unproven everywhere, a null in the booleans, never a false for a 1 s eval
    assert audit["eval_time"]["status"] == UNPROVEN and sub["compliance"]["eval_under_600s"] is None
    # One bytes_total: the audit's, submission.json's and every figure the README prints
    total = audit["artifact_bytes"]["evidence"]["bytes_total"]
    assert sub["bytes_total"] == total
    figures = {
        int(n.replace(",", "")) for n in re.findall(r"(\d{1,3}(?:,\d{3})+) of 16,000,000", readme)
    }
    assert figures == {total}
    assert f"| {total:,} |" in readme  # the per-seed row
