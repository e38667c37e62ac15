"""`pgolf export`: the records folder, and a single-file train_gpt.py that reproduces the run."""

from __future__ import annotations

import ast
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
from pgolf.config import load_preset
from pgolf.data.shards import read_shard, write_shard
from pgolf.export.bundle import bundled_code, is_lean
from pgolf.export.reach import minify

TINY = [
    "--set", "model.num_layers=2", "--set", "model.model_dim=64",
    "--set", "model.num_heads=4", "--set", "model.num_kv_heads=2",
    "--set", "train.train_seq_len=64", "--set", "train.train_batch_tokens=1024",
    "--set", "train.iterations=3", "--set", "train.warmdown_iters=1",
    "--set", "train.warmup_steps=0", "--set", "train.max_wallclock_seconds=0",
    "--set", "train.seed=7",
]  # fmt: skip
# Runs the exported script where only what a record needs can be imported (tqdm and safetensors
# raise ImportError), then proves every pgolf module came from the script itself and prints their
# names. One torch thread, as in this process (conftest): a float sum split over more threads
# rounds differently.
CHECK = """
import json, runpy, sys
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
print("BUNDLE-ONLY", json.dumps(sorted(n for n in sys.modules if n.split(".")[0] == "pgolf")))
"""
# pgolf modules no exported script needs: the CLI, data building and fetching, plots, sinks'
# backends, the audit's probes, the exporter itself
NEVER_BUNDLED = (
    "pgolf.cli", "pgolf.data.build", "pgolf.data.fetch", "pgolf.data.demo", "pgolf.observe.plot",
    "pgolf.observe.ablate", "pgolf.cli.observe", "pgolf.audit.probes",
    "pgolf.cli.audit", "pgolf.export.bundle", "pgolf.export.submission",
)  # fmt: skip
# pr1019's stack, small enough to train in seconds (tests/test_golden.py)
STACK = [
    "--set", "quant.codec=mixed", "--set", "model.bigram_vocab_size=64",
    "--set", "model.bigram_dim=32", "--set", "model.ve_dim=32", "--set", "model.ve_layers=-1",
    "--set", "quant.selfgen_seqs=2", "--set", "quant.keep_float_max_numel=1024",
    "--set", "eval.eval_stride=32", "--set", "eval.eval_seq_len=64",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_data(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_data")
    for f in tiny_dataset.iterdir():
        if "_val_" not in f.name:
            shutil.copy(f, out / f.name)
    tokens = np.asarray(read_shard(tiny_dataset / "fineweb_val_000000.bin"))
    write_shard(out / "fineweb_val_000000.bin", tokens[:2049])
    return out


def tiny_run(preset: str, data: Path, run: Path, *sets: str) -> Path:
    code = main(["run", "--preset", preset, "--data", str(data), "--out", str(run), "--json",
                 *TINY, *sets])  # fmt: skip
    assert code == 0
    return run


@pytest.fixture(scope="module")
def seed_run(small_data, tmp_path_factory):
    """A baseline run: it exports as the lean script (`pgolf.export.lean`)."""
    return tiny_run("baseline", small_data, tmp_path_factory.mktemp("export_run") / "run")


TRAIN_CALIBRATION = ["--set", "quant.calib_source=train", "--set", "quant.calib_batches=2"]
# A baseline setting the lean script does not implement (P639's value residuals): the run then
# exports as the bundle of pgolf's own modules.
BUNDLED = ["--set", "model.value_residual=true"]


@pytest.fixture(scope="module")
def bundle_run(small_data, tmp_path_factory):
    run = tiny_run("baseline", small_data, tmp_path_factory.mktemp("bundle_run") / "run", *BUNDLED)
    assert not is_lean(json.loads((run / "config.json").read_text()))
    return run


def test_export_writes_the_records_folder(seed_run, tmp_path, capsys):
    out = tmp_path / "2026-01-01_tiny"
    flags = ["--author", "Ada", "--github-id", "ada", "--name", "Tiny", "--blurb", "a test"]
    code = main(["export", str(seed_run), "--out", str(out), *flags, "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "requirements.txt", "submission.json", "train_gpt.py",
                     "train_gpt_readable.py", "train_seed7.log"]  # fmt: skip
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
    # the lean script needs no pgolf and no TOML reader
    assert [r.split("==")[0] for r in requirements] == ["numpy", "sentencepiece", "torch"]
    readable = (out / "train_gpt_readable.py").read_text()
    assert "import pgolf" not in readable and "from pgolf" not in readable
    assert "record-style script" in readme


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


def embedded_sources(script: str) -> dict[str, str]:
    """The module sources a bundled script carries (`SOURCES[name] = '...'`), read, never run."""
    out = {}
    for node in ast.parse(script).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript):
            out[ast.literal_eval(node.targets[0].slice)] = ast.literal_eval(node.value)
    return out


def unwrap(stub: str) -> str:
    payload = stub.split('b85decode("')[1].split('")')[0]
    filters = [{"id": lzma.FILTER_LZMA2}]
    return lzma.decompress(base64.b85decode(payload), lzma.FORMAT_RAW, filters=filters).decode()


def run_exported(out: Path, data: Path) -> tuple[dict, list[str]]:
    """Run the shipped script alone on `data`: its report and the pgolf modules it loaded."""
    shutil.copytree(data, out / "data")
    # -I: no PYTHONPATH, no user site, no cwd on sys.path; the script must carry pgolf itself
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PGOLF"))}
    env["PGOLF_DEVICE"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-I", "-c", CHECK], cwd=out, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    seed = json.loads((out / "submission.json").read_text())["seeds"][0]
    report = json.loads(Path(out / f"run_seed{seed}" / "report.json").read_text())
    return report, json.loads(proc.stdout.split("BUNDLE-ONLY ")[1])


def check_export_reproduces(run: Path, data: Path, out: Path) -> list[str]:
    """Export `run`, run the shipped script alone on `data`; the pgolf modules it loaded."""
    assert main(["export", str(run), "--out", str(out)]) == 0
    stub = (out / "train_gpt.py").read_text()
    assert stub.count("\n") == 2 and stub.startswith("import base64,lzma\n")
    readable = (out / "train_gpt_readable.py").read_text()
    if is_lean(json.loads((run / "config.json").read_text())):
        # one script: the shipped one is the readable one minified
        assert unwrap(stub) == minify(readable) and '"""' in readable
    else:
        shipped = embedded_sources(unwrap(stub))
        readable = embedded_sources(readable)
        # the shipped modules are the readable ones minified, no more and no fewer
        assert sorted(shipped) == sorted(readable)
        assert all(shipped[name] == minify(text) for name, text in readable.items())
        assert any('"""' in text for text in readable.values())  # docstrings kept for review
        assert not any('"""' in text for text in shipped.values())
    sub = json.loads((out / "submission.json").read_text())
    assert sub["bytes_code"] == (out / "train_gpt.py").stat().st_size
    report, loaded = run_exported(out, data)
    original = json.loads((run / "report.json").read_text())
    assert report["val_bpb"] == original["val_bpb"]  # bit-identical
    assert report["bytes_model"] == original["bytes_model"]
    # the script counts itself as its code bytes, and the run counted the same file
    assert report["bytes_code"] == (out / "train_gpt.py").stat().st_size == original["bytes_code"]
    assert not set(loaded) & set(NEVER_BUNDLED)
    return loaded


def test_the_exported_lean_script_alone_reproduces_the_run(seed_run, small_data, tmp_path):
    loaded = check_export_reproduces(seed_run, small_data, tmp_path / "sub")
    assert loaded == []  # not one pgolf module: the lean script is the whole pipeline
    artifact = (tmp_path / "sub" / "run_seed7" / "artifact.pgolf").read_bytes()
    assert artifact == (seed_run / "artifact.pgolf").read_bytes()  # byte for byte


def test_the_exported_bundle_alone_reproduces_its_run(bundle_run, small_data, tmp_path):
    loaded = check_export_reproduces(bundle_run, small_data, tmp_path / "sub")
    # int8-zlib, no TTT, no QAT: those modules are stand-ins, their code is not shipped
    stand_ins = {"pgolf.quant.pipeline", "pgolf.eval.ttt", "pgolf.eval.prequant", "pgolf.train.qat"}
    shipped = embedded_sources(unwrap((tmp_path / "sub" / "train_gpt.py").read_text()))
    assert not stand_ins & set(shipped)
    assert "pgolf.quant.gptq" not in loaded and "pgolf.quant.pipeline" in loaded


def test_the_exported_pr1019_script_is_lean_and_reproduces_its_run(small_data, tmp_path):
    """GPTQ on self-generated calibration, EMA, BigramHash, VE, the section container: all
    in the lean script, which loads not one pgolf module and writes the run's artifact."""
    run = tiny_run("pr1019", small_data, tmp_path / "run", *STACK)
    assert check_export_reproduces(run, small_data, tmp_path / "sub") == []
    artifact = (tmp_path / "sub" / "run_seed7" / "artifact.pgolf").read_bytes()
    assert artifact == (run / "artifact.pgolf").read_bytes()


def test_an_exported_mixed_codec_bundle_reproduces_its_run(small_data, tmp_path):
    """Calibration on training data is not in the lean script: that run ships the bundle."""
    run = tiny_run("pr1019", small_data, tmp_path / "run", *STACK, *TRAIN_CALIBRATION)
    assert not is_lean(json.loads((run / "config.json").read_text()))
    loaded = check_export_reproduces(run, small_data, tmp_path / "sub")
    assert {"pgolf.quant.gptq", "pgolf.quant.pipeline"} <= set(loaded)


def test_a_setting_that_would_need_left_out_code_is_refused(bundle_run, tmp_path):
    """The bundle has no TTT code: TTT_ENABLED=1 stops it before anything runs."""
    out = tmp_path / "sub"
    assert main(["export", str(bundle_run), "--out", str(out)]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PGOLF"))}
    proc = subprocess.run(
        [sys.executable, "-I", "train_gpt.py"], cwd=out, env={**env, "TTT_ENABLED": "1"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "eval.ttt_enabled is fixed at False" in proc.stderr
    assert not (out / "run_seed7").exists()


def test_the_bundle_follows_the_config():
    baseline = bundled_code(load_preset("baseline").to_dict())
    ttt = bundled_code(load_preset("pr1413").to_dict())
    assert "pgolf.eval.ttt" in baseline.stand_ins and "pgolf.eval.ttt" in ttt.modules
    assert "pgolf.quant.gptq" not in baseline.modules and "pgolf.quant.gptq" in ttt.modules
    for code in (baseline, ttt):
        assert not set(code.modules) & set(NEVER_BUNDLED)
        assert "pgolf.observe.sinks" in code.stand_ins  # the script takes no --log
    # the frontier's techniques ship only where the config switches them on
    frontier = bundled_code(load_preset("top").to_dict())
    stack = bundled_code(load_preset("pr1019").to_dict())
    switched = {
        "pgolf.eval.lora_ttt",
        "pgolf.model.lora",
        "pgolf.quant.lqer",
        "pgolf.model.doc_mask",
    }
    assert switched <= set(frontier.modules) and not switched & set(stack.modules)
    assert {"pgolf.quant.lqer", "pgolf.model.doc_mask"} <= stack.stand_ins
    # a top-level definition nothing reached calls is left out of a module that is bundled
    assert "pgolf.run" in baseline.modules and "summary_rows" in baseline.kept["pgolf.run"]
    assert "evaluation_rows" not in baseline.kept["pgolf.run"]  # `pgolf eval`'s table
    assert "def evaluation_rows" not in baseline.readable()["pgolf.run"]


def test_minify_drops_docstrings_comments_and_annotations_and_nothing_else():
    source = '''"""Module docs."""
from __future__ import annotations


def f(x: int, *rest: str, k: float = 2.0) -> list[str]:
    """Docs."""
    # a comment
    return [f"{x * k}", *rest]


class C:
    """Only docs."""
'''
    small = minify(source)
    assert "docs" not in small.lower() and "comment" not in small and "int" not in small
    assert minify(small) == small
    mine, theirs = {}, {}
    exec(compile(source, "a", "exec"), mine)
    exec(compile(small, "b", "exec"), theirs)
    assert mine["f"](3, "y", k=0.5) == theirs["f"](3, "y", k=0.5) == ["1.5", "y"]
    assert theirs["C"].__doc__ is None


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
    from pgolf.audit.checks import audit_run
    from pgolf.rules import UNPROVEN, ok_of

    audit = {v["rule"]: v for v in audit_run(seed_run)["verdicts"]}
    out = tmp_path / "export"
    assert main(["export", str(seed_run), "--out", str(out)]) == 0
    sub = json.loads((out / "submission.json").read_text())
    readme = (out / "README.md").read_text()
    report = json.loads((seed_run / "report.json").read_text())
    # one name per rule: every rule of the run's record is one the audit and export decide
    assert set(report["compliance"]) <= set(audit) and set(report["compliance"]) <= set(
        sub["compliance"]
    )
    for key, entry in report["compliance"].items():
        status = audit[key]["status"]
        assert entry["status"] == status, key
        assert entry["ok"] is ok_of(status), key
        assert sub["compliance"][key] is ok_of(status), key
        assert f"| {key} | {status if status != 'fail' else '**fail**'} |" in readme, key
    # CPU timings: unproven everywhere, a null in the booleans, never a false for a 1 s eval
    assert audit["eval_under_600s"]["status"] == UNPROVEN
    assert sub["compliance"]["eval_under_600s"] is None
    # One bytes_total: the audit's, submission.json's and every figure the README prints
    total = audit["artifact_under_16mb"]["evidence"]["bytes_total"]
    assert sub["bytes_total"] == total == report["bytes_total"]
    figures = {
        int(n.replace(",", "")) for n in re.findall(r"(\d{1,3}(?:,\d{3})+) of 16,000,000", readme)
    }
    assert figures == {total}
    assert f"| {total:,} |" in readme  # the per-seed row
