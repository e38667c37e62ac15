"""`pgolf ablate`: variants × seeds as run directories, a Welch table, resumable."""

from __future__ import annotations

import json

import pytest

from pgolf.cli import main
from pgolf.errors import PgolfError
from pgolf.observe.ablate import pipeline_run_fn, run_ablation, summarize, variants

TINY = [
    "model.num_layers=2", "model.model_dim=64", "model.num_heads=4", "model.num_kv_heads=2",
    "train.train_seq_len=64", "train.train_batch_tokens=1024", "train.iterations=4",
    "train.warmdown_iters=2", "train.warmup_steps=0", "train.max_wallclock_seconds=0",
    "eval.max_val_tokens=4097", "eval.val_batch_tokens=4096",
]  # fmt: skip


def test_variants_are_the_preset_each_switch_alone_and_all_together():
    names = [name for name, _ in variants(["model.xsa_last_n=1", "model.ln_scale=true"])]
    assert names == ["baseline", "model.xsa_last_n=1", "model.ln_scale=true", "all"]
    assert [name for name, _ in variants(["model.ln_scale=true"])] == [
        "baseline",
        "model.ln_scale=true",
    ]
    with pytest.raises(PgolfError, match="section.key=value"):
        variants(["ln_scale"])


def test_the_table_tests_each_variant_against_the_preset():
    rows = [
        {"variant": v, "val_bpb": b, "bytes_total": 10, "train_time_s": 1.0, "eval_time_s": 1.0}
        for v, b in [("baseline", 2.0), ("baseline", 2.2), ("x=1", 1.8), ("x=1", 1.9)]
    ]
    base, x = summarize(rows, ["baseline", "x=1"])
    assert base["welch_t"] is None and base["val_bpb_mean"] == pytest.approx(2.1)
    assert x["delta_bpb"] == pytest.approx(-0.25) and x["welch_t"] < 0 and 0 < x["p_value"] < 1


def test_ablate_runs_every_variant_then_reuses_finished_ones(tiny_dataset, tmp_path, capsys):
    common = [*TINY, f"data.path={tiny_dataset}"]
    calls = []
    real = pipeline_run_fn("baseline", echo=False)

    def counting(run_dir, assignments):
        calls.append(run_dir.name)
        return real(run_dir, assignments)

    switch = ["model.ln_scale=true"]
    first = run_ablation("baseline", switch, 1, common, tmp_path / "abl", counting, base_seed=7)
    assert calls == ["baseline_s7", "model.ln_scale_true_s7"]
    assert [row["variant"] for row in first["table"]] == ["baseline", "model.ln_scale=true"]
    assert all(row["val_bpb_mean"] > 0 for row in first["table"])
    saved = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert saved["table"] == json.loads(json.dumps(first["table"]))
    assert "| `model.ln_scale=true` | 1 |" in (tmp_path / "abl" / "ablation.md").read_text()
    config = json.loads((tmp_path / "abl" / "model.ln_scale_true_s7" / "config.json").read_text())
    assert config["model"]["ln_scale"] is True and config["train"]["seed"] == 7

    calls.clear()
    again = run_ablation("baseline", switch, 1, common, tmp_path / "abl", counting, base_seed=7)
    assert calls == [] and all(row["skipped"] for row in again["runs"])
    assert again["table"] == first["table"]

    # The command line resumes the same directory: nothing is trained again.
    sets = [arg for kv in [*TINY, "train.seed=7"] for arg in ("--set", kv)]
    code = main(["ablate", "--preset", "baseline", "--switch", "model.ln_scale=true",
                 "--seeds", "1", "--data", str(tiny_dataset), "--out", str(tmp_path / "abl"),
                 *sets, "--json"])  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and all(row["skipped"] for row in printed["runs"])
