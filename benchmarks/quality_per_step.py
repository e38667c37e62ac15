"""Quality per step: val_bpb of the baseline vs each training technique alone vs all together.

A fixed CPU shape (4 layers × 128, seq 256, 8,192 tokens/step, 400 steps) trained on the
2,800-document FineWeb sample tokenized with the official sp1024 tokenizer; validation is the 200
official verification documents, scored non-overlapping (SPEC §3.5) with the float weights
(`val_bpb`) and with every block matrix rounded to int6 per row at the 99.95th-percentile clip
(`val_bpb_int6`, what QAT is meant to protect). Two seeds per variant by default.

    python benchmarks/quality_per_step.py [--work DIR] [--jobs 2] [--only baseline,ema] [--table]

Averaging never changes the training trajectory, so the averaging variants (EMA with the
run-relative horizon, EMA 0.997, SWA, their blend) are views of the baseline run: extra averagers
follow the baseline's weights and each is scored on its own. That makes them free; every other
variant is its own training run.

Incremental and parallel-safe: each (variant, seed) result is a JSON file under WORK/results,
written atomically and skipped when present; a run in progress holds WORK/locks/NAME.lock (with
its pid), so several invocations, or `--jobs N` workers, never train the same run twice. Runs go
variant by variant (both seeds of one variant, then the next), in the order of `--only`. Prints
one JSON line per result, then one summary line per variant (mean over seeds, Δ vs baseline).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from runlock import claim  # benchmarks/ is the script's directory, so on sys.path

from pgolf.config import load_preset
from pgolf.data.build import build_dataset
from pgolf.data.dataset import resolve_dataset
from pgolf.data.shards import load_tokens
from pgolf.data.tokenizer import build_byte_tables, load_tokenizer
from pgolf.dist import World
from pgolf.eval.bpb import TorchByteTables
from pgolf.eval.score import score_nonoverlapping
from pgolf.fileio import write_text_atomic
from pgolf.model.layers import CastedLinear
from pgolf.model.roles import role_of
from pgolf.runlog import RunLog
from pgolf.settings import shared_data
from pgolf.train.averaging import WeightAverager
from pgolf.train.qat import fake_quantize_rows
from pgolf.train.trainer import Trainer

STEPS = 400
SEEDS = (1337, 1338)
SHARD_TOKENS = 2**18  # ≈11 train shards, so the multi-shard loaders have shards to mix

# Each variant changes only what its name says. The windows are scaled to a 400-step run:
# SWA snapshots every 5 steps while the LR scale < 0.5 (the last 50 steps: 10 snapshots).
SWA = {"swa_enabled": True, "swa_every": 5, "swa_start_frac": 0.5}
VIEWS: dict[str, dict] = {  # averaging only: scored on the baseline run's trajectory
    "ema": {"ema_enabled": True},  # run-relative horizon: window = 400/21 ≈ 19 steps
    "ema_0.997": {"ema_enabled": True, "ema_decay": 0.997},  # the records' absolute decay
    "swa": SWA,
    "ema+swa": {"ema_enabled": True, **SWA},
}
VARIANTS: dict[str, dict] = {
    "baseline": {},
    **VIEWS,
    "late_qat": {"late_qat_threshold": 0.15},
    "early_qat": {"late_qat_threshold": 0.5, "qat_clip_percentile": 99.95},
    "muon_wd": {"muon_wd": 0.04},
    "muoneq_r": {"muon_row_normalize": True},
    "polar_express": {"muon_polar_express": True},
    "adam_wd": {"adam_wd": 0.04, "embed_wd": 0.04},
    "grad_clip": {"grad_clip_norm": 0.3},
    "warmdown_frac": {"warmdown_frac": 0.667},
    "coprime_loader": {"train_loader": "coprime"},
    "shuffled_loader": {"train_loader": "shuffled"},
}
VARIANTS["all"] = {
    "ema_enabled": True,
    "swa_enabled": True,
    "swa_every": 5,
    "swa_start_frac": 0.5,
    "late_qat_threshold": 0.15,
    "muon_wd": 0.04,
    "muon_row_normalize": True,
    "muon_polar_express": True,
    "adam_wd": 0.04,
    "embed_wd": 0.04,
    "grad_clip_norm": 0.3,
    "warmdown_frac": 0.667,
    "train_loader": "coprime",
}
CPU = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def dataset(work: Path) -> Path:
    """Train = the 2,800-document sample, val = the 200 verification documents (built once)."""
    out = work / "data"
    if (out / "meta.json").is_file():
        return out
    pilot = sorted(shared_data("corpus", "fineweb_legal_pilot", "derived").glob("*.jsonl.gz"))
    verify = shared_data("corpus", "fineweb_pg_verify_docs", "verify_docs.jsonl")
    try:
        # The first `val_docs` documents form the val split: the verification docs go first.
        build_dataset(
            [verify, *pilot],
            out,
            tokenizer=shared_data("tokenizers", "fineweb_1024_bpe.model"),
            val_docs=200,
            shard_tokens=SHARD_TOKENS,
            progress=False,
        )
    except Exception:
        if not (out / "meta.json").is_file():  # another process won the race: use its build
            raise
    return out


def run_config(data_dir: Path, variant: str, seed: int, steps: int = STEPS):
    cfg = load_preset("demo")
    cfg.data.path = str(data_dir)
    t = cfg.train
    t.seed, t.iterations, t.max_wallclock_seconds = seed, steps, 0.0
    t.warmdown_iters, t.train_log_every = steps // 4, 25
    for key, value in VARIANTS[variant].items():
        setattr(t, key, value)
    return cfg


def matrix_names(model: torch.nn.Module) -> list[str]:
    # Read on the trained model: deepcopy does not carry a Parameter's role attribute.
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, CastedLinear) and role_of(m.weight) == "matrix"
    ]


@torch.no_grad()
def int6_copy(model: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """The model with every block matrix rounded per row to int6 at the 99.95th-pct clip."""
    q = copy.deepcopy(model)
    modules = dict(q.named_modules())
    for name in names:
        w = modules[name].weight
        w.copy_(fake_quantize_rows(w, 6, 99.95))
    return q


def _follow(trainer: Trainer, views: dict[str, dict]) -> dict[str, WeightAverager]:
    """Extra averagers fed the same updates as the trainer's own (which may be switched off)."""
    followers = {}
    for name, overrides in views.items():
        view_cfg = dataclasses.replace(trainer.cfg.train, **overrides)
        followers[name] = WeightAverager(trainer.model, view_cfg)
    own = trainer.averager.update

    def update(model, step, lr_scale, elapsed_ms, max_wallclock_ms):
        own(model, step, lr_scale, elapsed_ms, max_wallclock_ms)
        for averager in followers.values():
            averager.update(model, step, lr_scale, elapsed_ms, max_wallclock_ms)

    trainer.averager.update = update
    return followers


def train_one(
    work: Path, data_dir: Path, variant: str, seed: int, threads: int, steps: int
) -> list[dict]:
    """Train one variant; return its result row and, for the baseline, one per averaging view."""
    torch.set_num_threads(threads)
    cfg = run_config(data_dir, variant, seed, steps)
    run_dir = work / "runs" / f"{variant}__{seed}"
    files = resolve_dataset(cfg.data)
    trainer = Trainer(cfg, files, CPU, run_dir, RunLog(run_dir, True, echo=False))
    followers = _follow(trainer, VIEWS) if variant == "baseline" else {}
    start = time.perf_counter()
    result = trainer.run()
    wall_s = time.perf_counter() - start
    matrices = matrix_names(trainer.model)
    val_tokens = load_tokens(files.val)
    tables = TorchByteTables(
        build_byte_tables(load_tokenizer(files.tokenizer), cfg.model.vocab_size), CPU.device
    )

    def bpb(model: torch.nn.Module) -> float:
        seq = cfg.train.train_seq_len
        return score_nonoverlapping(model, val_tokens, seq, 65536, tables, CPU).bpb

    def row(name: str, model: torch.nn.Module, weights: str) -> dict:
        float_bpb, int6_bpb = bpb(model), bpb(int6_copy(model, matrices))
        return {
            "variant": name,
            "seed": seed,
            "val_bpb": round(float_bpb, 5),
            "val_bpb_int6": round(int6_bpb, 5),
            "final_train_loss": round(result.final_train_loss, 4),
            "steps": result.steps,
            "weights": weights,
            "trained_as": variant,
            "ms_per_step": round(result.train_time_ms / max(result.steps, 1), 1),
            "wall_s": round(wall_s, 1),
            "threads": threads,
        }

    rows = [row(variant, trainer.model, result.weights)]
    for name, averager in followers.items():
        averaged = copy.deepcopy(trainer.model)
        rows.append(row(name, averaged, averager.apply_to(averaged)))
    return rows


def _result_path(work: Path, variant: str, seed: int) -> Path:
    return work / "results" / f"{variant}__{seed}.json"


def job(args: tuple) -> list[dict]:
    work, data_dir, variant, seed, threads, steps = args
    run = "baseline" if variant in VIEWS else variant
    path = _result_path(work, variant, seed)
    if path.is_file():
        return [json.loads(path.read_text())]
    with claim(work / "locks" / f"{run}__{seed}.lock") as mine:
        if not mine or path.is_file():  # another worker is on it, or just finished it
            return []
        # A killed run restarts from scratch: its half-written run dir is not a checkpoint.
        shutil.rmtree(work / "runs" / f"{run}__{seed}", ignore_errors=True)
        rows = train_one(work, data_dir, run, seed, threads, steps)
        for row in rows:
            out = _result_path(work, row["variant"], seed)
            out.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out, json.dumps(row) + "\n")
        return [r for r in rows if r["variant"] == variant]


def summarize(work: Path, variants: list[str]) -> list[dict]:
    rows = {}
    for path in sorted((work / "results").glob("*.json")):
        row = json.loads(path.read_text())
        rows.setdefault(row["variant"], []).append(row)
    base = rows.get("baseline", [])
    base_bpb = sum(r["val_bpb"] for r in base) / len(base) if base else None
    base_q = sum(r["val_bpb_int6"] for r in base) / len(base) if base else None
    out = []
    for v in variants:
        got = rows.get(v)
        if not got:
            continue
        mean = sum(r["val_bpb"] for r in got) / len(got)
        mean_q = sum(r["val_bpb_int6"] for r in got) / len(got)
        spread = max(r["val_bpb"] for r in got) - min(r["val_bpb"] for r in got)
        out.append(
            {
                "summary": v,
                "seeds": sorted(r["seed"] for r in got),
                "val_bpb": round(mean, 4),
                "seed_spread": round(spread, 4),
                "delta": None if base_bpb is None else round(mean - base_bpb, 4),
                "val_bpb_int6": round(mean_q, 4),
                "delta_int6": None if base_q is None else round(mean_q - base_q, 4),
                "ms_per_step": round(sum(r["ms_per_step"] for r in got) / len(got), 1),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "pgolf_quality")
    p.add_argument("--only", default="", help="comma-separated variants (default: all)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--steps", type=int, default=STEPS, help="a smaller number only to smoke-test")
    p.add_argument("--table", action="store_true", help="only summarise what is already done")
    args = p.parse_args(argv)
    variants = [v for v in args.only.split(",") if v] or list(VARIANTS)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    work = args.work.resolve()
    if not args.table:
        data_dir = dataset(work)
        seeds = [int(s) for s in args.seeds.split(",") if s]
        # Variant-major: both seeds of a variant finish together, in the order asked for.
        todo = [(work, data_dir, v, s, args.threads, args.steps) for v in variants for s in seeds]
        if args.jobs > 1:
            with mp.get_context("spawn").Pool(args.jobs) as pool:
                for rows in pool.imap(job, todo):
                    for row in rows:
                        emit(**row)
        else:
            for item in todo:
                for row in job(item):
                    emit(**row)
    for row in summarize(work, variants):
        emit(**row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
