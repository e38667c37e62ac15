"""Training throughput: tokens/s and ms/step of the full optimizer step (Muon + Adam).

Prints one JSON object per line. Shapes: the `demo` preset, and the 4-layer×128 baseline shape
(seq 256, 8,192 tokens/step, grad_accum 8 as upstream) that the issue compares with the official
script (~14,000 tokens/s in fp32 on 2 CPU cores). On CUDA it also times the `baseline` preset.

    python benchmarks/train_throughput.py [--steps 20] [--warmup 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pgolf.config import resolve_config
from pgolf.data.dataset import resolve_dataset
from pgolf.data.shards import read_shard, write_shard
from pgolf.dist import init_world
from pgolf.runlog import RunLog
from pgolf.settings import shared_data
from pgolf.train.trainer import Trainer

SHAPES = {
    "demo": ("demo", []),
    "baseline_4x128": (
        "baseline",
        [
            "model.num_layers=4",
            "model.model_dim=128",
            "model.num_heads=4",
            "model.num_kv_heads=2",
            "train.train_seq_len=256",
            "train.train_batch_tokens=8192",
        ],
    ),  # fmt: skip
    "baseline": ("baseline", []),
}


def make_dataset(root: Path) -> Path:
    tokens = np.asarray(
        read_shard(shared_data("corpus", "fineweb_pg_sp1024_dev_shard", "fineweb_train_000000.bin"))
    )
    write_shard(root / "fineweb_train_000000.bin", tokens[:-50_000])
    write_shard(root / "fineweb_val_000000.bin", tokens[-50_000:])
    shutil.copy(shared_data("tokenizers", "fineweb_1024_bpe.model"), root / "tokenizer.model")
    return root


def time_shape(name: str, data: Path, steps: int, warmup: int, world) -> dict:
    preset, sets = SHAPES[name]
    cfg = resolve_config(
        preset,
        [*sets, f"data.path={data}", f"train.iterations={steps + warmup}", "train.warmup_steps=0",
         "train.max_wallclock_seconds=0"],
        environ={},
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(
            cfg, resolve_dataset(cfg.data), world, Path(run_dir), RunLog(run_dir, False)
        )
        for _ in range(warmup):
            trainer._train_step(1.0)
        if world.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer._train_step(1.0)
        if world.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    tokens = cfg.train.train_batch_tokens * steps
    return {
        "benchmark": "train_throughput",
        "shape": name,
        "device": str(world.device),
        "threads": torch.get_num_threads(),
        "steps": steps,
        "ms_per_step": round(1000 * seconds / steps, 2),
        "tokens_per_s": round(tokens / seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--shapes", nargs="*", default=None)
    args = parser.parse_args()
    world = init_world()
    shapes = args.shapes or (["demo", "baseline_4x128"] + (["baseline"] if world.is_cuda else []))
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp))
        for name in shapes:
            print(json.dumps(time_shape(name, data, args.steps, args.warmup, world)), flush=True)


if __name__ == "__main__":
    main()
