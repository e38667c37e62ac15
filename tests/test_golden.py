"""Golden losses: the refactor guard (issue #15). The first 20 training losses and the final
val_bpb of two tiny runs — the `demo` preset (int8 + zlib, non-overlapping eval) and the `pr1019`
stack (banked init, EMA, GPTQ on self-generated calibration, sliding eval) — pinned to the bit on
this project's CPU (torch 2.13.0+cpu, one thread). A restructuring that changes none of the
arithmetic keeps them equal; one that does fails here with the step and both values.

To re-pin after a change that is *meant* to move numbers, run `python -m tests.test_golden` and
paste its output below, saying why in the commit.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pgolf.cli import main
from pgolf.data.shards import read_shard, write_shard

TINY = {
    "model.num_layers": 2, "model.model_dim": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
    "train.train_seq_len": 64, "train.train_batch_tokens": 1024, "train.iterations": 20,
    "train.warmdown_iters": 5, "train.warmup_steps": 0, "train.max_wallclock_seconds": 0,
    "train.train_log_every": 1, "train.seed": 1337, "eval.eval_seq_len": 64,
    "eval.max_val_tokens": 4097,
}  # fmt: skip
STACK = {
    "model.bigram_vocab_size": 64, "model.bigram_dim": 32, "model.ve_dim": 32,
    "model.ve_layers": "-1", "quant.selfgen_seqs": 2, "quant.keep_float_max_numel": 1024,
    "eval.eval_stride": 32,
}  # fmt: skip
RUNS = {"demo": TINY, "pr1019": {**TINY, **STACK}}

GOLDEN: dict[str, dict] = {
    "demo": {
        "train_losses": [
            6.935245513916016,
            7.151176452636719,
            6.8473968505859375,
            6.591777801513672,
            6.5572285652160645,
            6.183503150939941,
            6.178811073303223,
            6.036231517791748,
            6.034996032714844,
            5.731388092041016,
            5.957478046417236,
            5.889403343200684,
            5.772185325622559,
            5.984833717346191,
            7.5999674797058105,
            5.913726329803467,
            5.6357622146606445,
            5.372697353363037,
            5.400957107543945,
            5.497278690338135,
        ],
        "val_bpb": 3.744399958230174,
    },
    "pr1019": {
        "train_losses": [
            6.93000602722168,
            6.956517934799194,
            6.685701370239258,
            6.3063371777534485,
            6.3721020221710205,
            6.12847113609314,
            5.959108591079712,
            6.009635508060455,
            6.08543062210083,
            5.925697147846222,
            6.083880960941315,
            5.970981538295746,
            5.824559152126312,
            6.092022180557251,
            6.256029725074768,
            5.937523424625397,
            5.684080481529236,
            5.499719560146332,
            5.470852851867676,
            5.705226123332977,
        ],
        "val_bpb": 3.8067581464441758,
    },
}


def golden_run(preset: str, data: Path, out: Path) -> dict:
    sets = [a for k, v in RUNS[preset].items() for a in ("--set", f"{k}={v}")]
    code = main(
        ["run", "--preset", preset, "--data", str(data), "--out", str(out), "--json", *sets]
    )
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    report = json.loads((out / "report.json").read_text())
    return {"train_losses": losses[:20], "val_bpb": report["val_bpb"]}


def golden_data(source: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if "_val_" not in f.name:
            shutil.copy(f, out / f.name)
    tokens = np.asarray(read_shard(source / "fineweb_val_000000.bin"))
    write_shard(out / "fineweb_val_000000.bin", tokens[:4097])
    return out


@pytest.mark.parametrize("preset", sorted(RUNS))
def test_golden_losses_and_final_score_are_unchanged(preset, tiny_dataset, tmp_path):
    if preset not in GOLDEN:
        pytest.fail(f"no golden values for {preset}: run `python -m tests.test_golden`")
    got = golden_run(preset, golden_data(tiny_dataset, tmp_path / "data"), tmp_path / "run")
    want = GOLDEN[preset]
    assert len(got["train_losses"]) == len(want["train_losses"]) == 20
    for step, (g, w) in enumerate(zip(got["train_losses"], want["train_losses"], strict=True), 1):
        assert g == w, f"{preset} train loss at step {step}: now {g!r}, golden {w!r}"
    assert got["val_bpb"] == want["val_bpb"], (
        f"{preset} val_bpb: now {got['val_bpb']!r}, golden {want['val_bpb']!r}"
    )


if __name__ == "__main__":  # print fresh golden values (see the docstring)
    import contextlib
    import tempfile

    import torch

    from tests.conftest import make_tiny_dataset

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tiny").mkdir()
        base = make_tiny_dataset(Path(tmp) / "tiny")
        data = golden_data(base, Path(tmp) / "data")
        with contextlib.redirect_stdout(sys.stderr):  # the runs' own --json lines
            result = {p: golden_run(p, data, Path(tmp) / p) for p in sorted(RUNS)}
    json.dump(result, sys.stdout, indent=1)
