"""The lean exported script (`pgolf.export.lean`): which configs it covers, what it costs, what
folding removes, and that it reproduces a two-process run. Its one-process reproduction of a
`pgolf run`, artifact byte for byte, is in tests/test_export.py with the bundle's."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf.config import load_preset, preset_names
from pgolf.export.bundle import is_lean, shipped_script
from pgolf.export.lean import flatten, lean_source, read_keys, uncovered

LEAN_PRESETS = ("baseline", "demo")
TINY = {
    "model.num_layers": 2, "model.model_dim": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
    "train.train_seq_len": 64, "train.train_batch_tokens": 1024, "train.iterations": 4,
    "train.warmdown_iters": 2, "train.warmup_steps": 2, "train.max_wallclock_seconds": 0.0,
    "eval.eval_seq_len": 64, "eval.val_batch_tokens": 2048, "eval.max_val_tokens": 4097,
}  # fmt: skip


def config(preset: str = "baseline", **settings) -> dict:
    out = load_preset(preset).to_dict()
    for key, value in settings.items():
        section, name = key.split("__")
        out[section][name] = value
    return out


def test_the_lean_script_covers_the_baseline_presets_and_no_technique_it_lacks():
    for name in preset_names():
        assert is_lean(load_preset(name).to_dict()) == (name in LEAN_PRESETS), name
    # each setting it does not implement is named, with its value
    missing = uncovered(load_preset("pr1019").to_dict())
    assert "model.bigram_vocab_size=3072" in missing and "quant.codec='mixed'" in missing
    assert uncovered(config(model__smear_gate="v1")) == ["model.smear_gate='v1'"]
    assert uncovered(config(eval__temperature=0.9)) == ["eval.temperature=0.9"]
    # settings that change no number (logging, the data's location) do not leave it
    assert uncovered(config(train__train_log_every=1, data__path="/elsewhere")) == []
    # a switched-off technique's own settings do not matter; switched on, they do
    assert uncovered(config(eval__ttt_lr=0.5)) == []
    assert "eval.ttt_enabled=True" in uncovered(config(eval__ttt_enabled=True))
    with pytest.raises(ValueError, match="model.value_residual=True"):
        lean_source(config(model__value_residual=True))


def test_the_shipped_lean_scripts_cost_what_a_records_code_does():
    # the targets of the lean export (issue #15): the official baseline's own code, minified
    # and compressed the same way, is 12,165 bytes
    for name in LEAN_PRESETS:
        assert len(shipped_script(load_preset(name).to_dict()).encode()) <= 12_000, name


def test_folding_turns_every_setting_into_code_and_drops_branches_it_decides():
    plain = lean_source(config())
    tree = ast.parse(plain)
    assert read_keys(tree) == set()  # no C["..."] is left
    assert not any(isinstance(n, ast.Name) and n.id == "C" for n in ast.walk(tree))
    # a decided `if` leaves only its taken branch
    assert "deepcopy" in plain  # warmup_steps = 20: the compile warm-up runs
    assert "deepcopy" not in lean_source(config(train__warmup_steps=0))
    assert "clip_grad_norm_" not in plain
    assert "clip_grad_norm_" in lean_source(config(train__grad_clip_norm=0.3))
    # "cuda" is decided at run time, "off" when exporting
    assert "inv_freq.bfloat16()" in plain
    assert "inv_freq.bfloat16()" not in lean_source(config(model__rope_bf16="off"))
    # values reach the code as literals: the run's own seed is the default of SEED
    assert "'SEED', 4242" in lean_source(config(train__seed=4242))


def test_every_setting_the_template_reads_is_a_real_setting():
    read = read_keys(ast.parse((Path(__file__).parents[1] / "src/pgolf/export/lean_train_gpt.py")
                               .read_text()))  # fmt: skip
    assert read and read <= set(flatten(load_preset("baseline").to_dict()))


# Techniques of the stacks the lean script implements, on the baseline: LeakyReLU(0.5)², LN scale,
# XSA on the last 2 of 3 layers, partial RoPE (8 of 16 dims) past its nominal length (NTK base),
# decoupled weight decay everywhere, gradient clipping, sliding-window eval.
STACK_PARTS = {
    "model.num_layers": 3, "model.mlp_leaky_slope": 0.5, "model.ln_scale": True,
    "model.xsa_last_n": 2, "model.rope_dims": 8, "model.rope_train_seq_len": 32,
    "train.muon_wd": 0.04, "train.adam_wd": 0.04, "train.embed_wd": 0.04,
    "train.grad_clip_norm": 0.3, "eval.eval_mode": "sliding", "eval.eval_stride": 16,
    "eval.eval_batch_windows": 5,
}  # fmt: skip


def test_the_lean_script_reproduces_the_stack_techniques_it_implements(tiny_dataset, tmp_path):
    from pgolf.cli import main

    run = tmp_path / "run"
    sets = [a for k, v in {**TINY, **STACK_PARTS}.items() for a in ("--set", f"{k}={v}")]
    args = ["run", "--preset", "baseline", "--data", str(tiny_dataset), "--out", str(run)]
    assert main([*args, "--json", *sets]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert is_lean(cfg)
    (tmp_path / "train_gpt.py").write_text(lean_source(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PGOLF_DEVICE="cpu", DATA_PATH=str(tiny_dataset), RUN_DIR=str(tmp_path / "lean"))
    proc = subprocess.run(
        [sys.executable, "-c", ONE_THREAD], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lean = json.loads((tmp_path / "lean" / "report.json").read_text())
    original = json.loads((run / "report.json").read_text())
    assert lean["val_bpb"] == original["val_bpb"]
    assert lean["pre_quant_val_bpb"] == original["pre_quant_val_bpb"]
    assert (tmp_path / "lean" / "artifact.pgolf").read_bytes() == (
        run / "artifact.pgolf"
    ).read_bytes()


# One torch thread, as in this process (conftest): a float sum split over more threads rounds
# differently.
ONE_THREAD = """
import runpy, sys, torch
torch.set_num_threads(1)
sys.argv = ["train_gpt.py"]
runpy.run_path("train_gpt.py", run_name="__main__")
"""


def test_two_lean_processes_reproduce_a_two_process_pgolf_run(tiny_dataset, tmp_path):
    """Under torchrun (gloo, two CPU ranks) the lean script and `pgolf run` agree bit for bit:
    gradient all-reduce, Muon's sharded update and the eval sums all line up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PGOLF_DEVICE="cpu", OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    sets = [a for key, value in TINY.items() for a in ("--set", f"{key}={value}")]
    run = tmp_path / "run"
    args = ["-m", "pgolf", "run", "--preset", "baseline", "--data", str(tiny_dataset)]
    proc = subprocess.run(
        [*launch, *args, "--out", str(run), *sets], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "train_gpt.py").write_text(
        lean_source(json.loads((run / "config.json").read_text()))
    )
    env.update(DATA_PATH=str(tiny_dataset), RUN_DIR=str(tmp_path / "lean"))
    proc = subprocess.run(
        [*launch, "train_gpt.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lean = json.loads((tmp_path / "lean" / "report.json").read_text())
    original = json.loads((run / "report.json").read_text())
    assert lean["val_bpb"] == original["val_bpb"] and lean["steps"] == original["steps"] == 4
    assert (tmp_path / "lean" / "artifact.pgolf").read_bytes() == (
        run / "artifact.pgolf"
    ).read_bytes()
