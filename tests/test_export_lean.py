"""The lean exported script (`pgolf.export.lean`): which configs it covers, what it costs, what
folding removes, and that it reproduces a two-process run. Its one-process reproduction of a
`pgolf run`, artifact byte for byte, is in tests/test_export.py with the bundle's."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.config import load_preset, preset_names
from pgolf.export.bundle import is_lean, shipped_script
from pgolf.export.lean import CONSTANTS, flatten, lean_source, read_keys, uncovered

LEAN_PRESETS = ("baseline", "demo", "pr1019")
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
    missing = uncovered(load_preset("pr414").to_dict())
    assert "quant.calib_source='train'" in missing and "quant.gptq_embed=True" in missing
    # a setting the template reads, at a value it does not implement
    assert uncovered(config(model__smear_gate="v2")) == ["model.smear_gate='v2'"]
    # the quantizer's settings matter only with the mixed codec
    assert uncovered(config(quant__matrix_clip="sdclip")) == []
    assert uncovered(config("pr1019", quant__matrix_clip="sdclip")) == [
        "quant.matrix_clip='sdclip'"
    ]
    assert uncovered(config(eval__temperature=0.9)) == ["eval.temperature=0.9"]
    # settings that change no number (logging, the data's location) do not leave it
    assert uncovered(config(train__train_log_every=1, data__path="/elsewhere")) == []
    # a switched-off technique's own settings do not matter; switched on, they do
    assert uncovered(config(eval__ttt_lr=0.5)) == []
    assert "eval.ttt_enabled=True" in uncovered(config(eval__ttt_enabled=True))
    with pytest.raises(ValueError, match="model.value_residual=True"):
        lean_source(config(model__value_residual=True))


def test_the_shipped_lean_scripts_cost_what_a_records_code_does():
    # the targets of the lean export (issue #15); the records' own code, minified and
    # compressed the same way: 12,161 bytes (baseline), 22,486 (S1019)
    targets = {"baseline": 12_000, "demo": 12_000, "pr1019": 20_000}
    for name in LEAN_PRESETS:
        size = len(shipped_script(load_preset(name).to_dict()).encode())
        assert size <= targets[name], (name, size)


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
    assert read and read <= set(flatten(load_preset("baseline").to_dict())) | set(CONSTANTS)


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


# -- pr1019's stack, piece by piece: the lean script's functions against pgolf's ----------------
PR1019_TINY = {
    "model.num_layers": 3, "model.model_dim": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.bigram_vocab_size": 64, "model.bigram_dim": 32, "model.ve_dim": 32,
    "model.ve_layers": "-2,-1", "model.rope_train_seq_len": 8, "train.train_seq_len": 12,
    "quant.selfgen_seqs": 3, "quant.selfgen_batch": 2, "quant.keep_float_max_numel": 1024,
}  # fmt: skip


@pytest.fixture(scope="module")
def pr1019_pair():
    """pgolf's config and model of a shrunk pr1019, and the lean script's namespace and model,
    both built from seed 0 (their initial weights must already agree)."""
    from pgolf.config import config_from_dict
    from pgolf.model.gpt import GPT

    config = load_preset("pr1019").to_dict()
    for key, value in PR1019_TINY.items():
        section, name = key.split(".")
        config[section][name] = value
    cfg = config_from_dict(config)
    lean = {"__name__": "lean_train_gpt"}
    exec(compile(lean_source(cfg.to_dict()), "train_gpt.py", "exec"), lean)
    torch.manual_seed(0)
    ours = GPT(cfg.model)
    torch.manual_seed(0)
    theirs = lean["GPT"]()
    return cfg, ours, lean, theirs


def test_the_lean_pr1019_model_starts_computes_and_decodes_as_pgolfs(pr1019_pair):
    from pgolf.quant.calibration import self_generated

    cfg, ours, lean, theirs = pr1019_pair
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)  # the same names in the same order: the artifact's order
    assert all(torch.equal(a[k], b[k]) for k in a)  # banked orthogonal init, draw for draw
    ids = torch.randint(
        0, cfg.model.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        assert torch.equal(ours(ids), theirs(ids))
        assert torch.equal(ours(ids, logits_from=5), theirs(ids, logits_from=5))
    # KV-cache sampling (past the NTK length of 8): the same tokens
    want = list(self_generated(ours, 3, 12, vocab_size=cfg.model.vocab_size, seed=1337,
                               batch_size=2))  # fmt: skip
    got = lean["self_generated"](theirs)
    assert len(got) == len(want) == 2 and all(
        torch.equal(x, y) for x, y in zip(got, want, strict=True)
    )


def test_the_lean_mixed_quantizer_packs_pgolfs_artifact_byte_for_byte(pr1019_pair, tmp_path):
    from pgolf.artifact.container import read_artifact
    from pgolf.artifact.mixed import dequantize_mixed
    from pgolf.dist import World
    from pgolf.quant.pipeline import calibrate, quantize_and_pack

    cfg, ours, lean, theirs = pr1019_pair
    with torch.no_grad():
        for p in ours.parameters():  # trained-looking weights
            p.copy_(torch.randn_like(p) * 0.05)
        ours.blocks[0].mlp.fc.weight[7] = 0.0  # so the MLP's output matrix has a dead input
    theirs.load_state_dict(ours.state_dict())
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    hessians, _ = calibrate(ours, cfg, None, world)
    gptq = [n for n, p in theirs.named_parameters() if p.role == "matrix"]
    lean_hessians = lean["hessians"](
        theirs, [n for n in gptq if theirs.get_parameter(n).numel() > 1024]
    )
    assert sorted(hessians) == sorted(lean_hessians)
    assert all(torch.equal(hessians[n], lean_hessians[n]) for n in hessians)
    assert hessians["blocks.0.mlp.proj.weight"][7, 7] == 0
    arrays, meta = lean["quantize_mixed"](theirs, lean_hessians)
    # the artifact under a target the configured lzma misses: auto, then ±1 pruning
    quantize_and_pack(ours, cfg.quant, hessians, (0, "-"), tmp_path / "a.pgolf")
    auto = replace(cfg.quant, compressor="auto")
    target = quantize_and_pack(ours, auto, hessians, (0, "-"))["bytes_model"] - 1500
    quant = replace(cfg.quant, target_bytes=target)
    report = quantize_and_pack(ours, quant, hessians, (0, "-"), tmp_path / "b.pgolf")
    assert report["codec_switched"] and report["pruned"]["count"] > 0
    for path, cap in (("a.pgolf", 10**9), ("b.pgolf", target)):
        data = lean["fit"]({k: v.copy() for k, v in arrays.items()}, meta, lean_hessians, cap)
        assert data == (tmp_path / path).read_bytes(), path
        state = lean["unpack_sections"](data)
        want = dequantize_mixed(*read_artifact(tmp_path / path))
        assert list(state) == list(want) and all(torch.equal(state[k], want[k]) for k in state)


def test_the_lean_section_codecs_write_pgolfs_bytes():
    from pgolf.artifact import rans
    from pgolf.artifact.container import pack_sections

    lean = {"__name__": "lean_train_gpt"}
    exec(compile(lean_source(load_preset("pr1019").to_dict()), "train_gpt.py", "exec"), lean)
    rng = np.random.default_rng(0)
    peaked = np.clip(np.round(rng.normal(0, 3, 70_000)), -31, 31).astype(np.int8)
    for symbols in (peaked, np.full(5, -2, np.int8), rng.integers(-128, 128, 9, dtype=np.int8)):
        blob = lean["rans_encode"](symbols.tobytes())
        assert blob == rans.encode(symbols)
        assert lean["rans_decode"](blob) == symbols.tobytes()
    arrays = {
        "big": peaked.reshape(700, 100),  # a section of its own, where rANS wins
        "small": peaked[:300].reshape(3, 100),
        "scales": rng.random(700).astype(np.float16),
    }
    for codec in ("auto", "lzma", "zstd", "brotli", "rans", "none"):
        ours = pack_sections(arrays, {"format": "x"}, codec=codec)
        data, _, chosen = lean["pack_sections"](arrays, {"format": "x"}, codec)
        assert data == ours.data, codec
        assert chosen == [s["codec"] for s in ours.sections]
    assert chosen[0] == "none" and lean["pack_sections"](arrays, {}, "auto")[2][0] == "rans"
