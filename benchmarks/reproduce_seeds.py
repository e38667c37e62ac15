"""Every seed preset (and the baseline) at one fixed CPU shape, end to end: train, quantize, score.

The presets keep everything that makes them what they are (techniques, optimizer settings,
quant codec, eval/TTT settings) and are shrunk only in size and time: 4 layers × 128, 4 heads,
seq 256 (train and eval), 8,192 tokens/step, STEPS steps with the last quarter as warm-down, no
wall-clock cap. Data: the FineWeb sample tokenized with the official sp1024 tokenizer, validation
= the 200 official verification documents (built once under WORK/data).

    python benchmarks/reproduce_seeds.py [--work DIR] [--steps 200] [--seeds 1337,1338]
        [--only baseline,seed-p639] [--table] [--report]

`--frontier` is the comparison of the frontier preset with the two it builds on (`top`, `pr1413`,
`pr1019`): all three on CaseOps SP8192 shards of the same documents (BPB on the original bytes,
from the byte sidecar), 8 layers so that the loops and the parallel lanes keep their places, and
the validation stream cut to `--max-val-tokens` so that per-document LoRA TTT fits a CPU.

Each (preset, seed) runs the `pgolf run` pipeline (pgolf.run.run_pipeline) in its own process (so a
crash or an out-of-memory kill loses one run, not the sweep) writing WORK/runs/PRESET_sSEED. On a
shared 2-core machine set OMP_NUM_THREADS=1: two spinning torch threads per run against other jobs
measured 3× slower than one. Resumable: a run whose report.json
has a post-quant `val_bpb` is skipped; a half-written one is removed and run again. Several
invocations may share WORK (e.g. one per seed): WORK/locks/RUN.lock makes each run train once.
Runs go seed by seed (every preset once, then the second seed), so an interrupted sweep still
covers every preset.
Prints one JSON line per run; `--table` prints the markdown table of README "Results at CPU scale";
`--report` tabulates the finished runs without training anything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from runlock import claim  # benchmarks/ is the script's directory, so on sys.path

from pgolf import rundir

PRESETS = ("baseline", "seed-p639", "seed-p610", "seed-p1004", "seed-p578")
SEEDS = (1337, 1338)
STEPS = 200
FRONTIER = ("top", "pr1413", "pr1019")
CASEOPS_TOKENIZER = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


def shrink(preset: str, steps: int, seed: int, frontier: dict | None = None) -> list[str]:
    """`--set` overrides for the common CPU shape; head layout kept (GQA 4→2, MHA stays MHA).

    `frontier` (layers, max_val_tokens) selects the frontier comparison's shape instead.
    """
    from pgolf.config import load_preset

    cfg = load_preset(preset)
    mha = cfg.model.num_kv_heads == cfg.model.num_heads
    sets = {
        "model.num_layers": frontier["layers"] if frontier else 4,
        "model.model_dim": 128,
        "model.num_heads": 4,
        "model.num_kv_heads": 4 if mha else 2,
        "train.train_seq_len": 256,
        "train.train_batch_tokens": 8192,
        "train.iterations": steps,
        "train.warmdown_iters": max(1, steps // 4),
        "train.warmup_steps": 0,
        "train.max_wallclock_seconds": 0,
        "train.seed": seed,
        "eval.eval_seq_len": 256,
        # The records keep tensors of ≤ 65,536 elements in fp16 at width 512; at width 128 every
        # matrix is that small, so the threshold shrinks with the width² (÷ 16) to keep its
        # meaning: vectors and gates stay fp16, matrices go through the preset's quantizer.
        "quant.keep_float_max_numel": 4096,
        # With TTT on, also score the artifact without it: the post-quant column (eval time
        # then includes that extra pass).
        "eval.ttt_score_baseline": "true",
        "train.train_log_every": 10,  # enough points for `pgolf plot`
    }
    if frontier:
        sets |= {
            "model.vocab_size": 8192,  # every preset on the same CaseOps SP8192 shards
            "eval.max_val_tokens": frontier["max_val_tokens"],
            # ~10 TTT chunks in the shortened stream (the records: ~1,200 of 32,768 tokens).
            "eval.ttt_chunk_tokens": 2048,
        }
        if cfg.eval.ttt_mode == "lora":  # the record's 2048-token context and 64-doc batches
            sets |= {
                "eval.ttt_lora_context": 256,
                "eval.ttt_lora_batch_docs": 8,
                "eval.ttt_prefix_docs": 8,
            }
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def data_dir(work: Path, caseops: bool) -> Path:
    """One folder per tokenization, so a work folder can hold both sweeps."""
    return work / ("data_caseops" if caseops else "data")


def build_data(work: Path, caseops: bool = False) -> Path:
    from pgolf.data.build import build_dataset
    from pgolf.settings import shared_data

    out = data_dir(work, caseops)
    if (out / "meta.json").is_file():
        return out
    corpus = shared_data("corpus")
    inputs = [corpus / "fineweb_pg_verify_docs" / "verify_docs.jsonl"]
    inputs += sorted((corpus / "fineweb_legal_pilot" / "derived").glob("*.jsonl.gz"))
    # The verification documents go first, so val_docs=200 makes them the validation set.
    build_dataset(
        inputs,
        out,
        tokenizer=shared_data(
            "tokenizers", CASEOPS_TOKENIZER if caseops else "fineweb_1024_bpe.model"
        ),
        val_docs=200,
        progress=False,
        overwrite=True,
        caseops=caseops,
    )
    return out


def result_row(preset: str, seed: int, steps: int, report: dict, wall_s: float | None) -> dict:
    ttt = report.get("ttt") or None
    return {
        "preset": preset,
        "seed": seed,
        "steps": report.get("steps", steps),
        "pre_quant_val_bpb": report.get("pre_quant_val_bpb"),
        "post_quant_val_bpb": report.get("val_bpb") if not ttt else ttt.get("bpb_before"),
        "ttt_val_bpb": report.get("val_bpb") if ttt else None,
        "val_bpb": report.get("val_bpb"),
        "eval_mode": report.get("eval_mode"),
        "codec": report.get("codec"),
        "bytes_model": report.get("bytes_model"),
        "bytes_total": report.get("bytes_total"),
        "train_time_s": report.get("train_time_s"),
        "calib_time_s": report.get("calib_time_s"),
        "eval_time_s": report.get("eval_time_s"),
        "wall_s": wall_s,
    }


def run_one(work: Path, preset: str, seed: int, steps: int, shape_args: list[str]) -> dict:
    run_dir = work / "runs" / f"{preset}_s{seed}"
    with claim(work / "locks" / f"{preset}_s{seed}.lock") as mine:
        if (report := rundir.finished_report(run_dir)) is not None:
            return {**result_row(preset, seed, steps, report, None), "skipped": True}
        if not mine:  # another invocation is training it right now
            return {"preset": preset, "seed": seed, "skipped": "running elsewhere"}
        return train_in_subprocess(work, run_dir, preset, seed, steps, shape_args)


def train_in_subprocess(
    work: Path, run_dir: Path, preset: str, seed: int, steps: int, shape_args: list[str]
) -> dict:
    report_path = run_dir / rundir.REPORT
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a run killed half way: start it again from scratch
    cmd = [sys.executable, __file__, "--work", str(work), "--steps", str(steps)]
    cmd += [*shape_args, "--one", f"{preset}:{seed}"]
    t0 = time.perf_counter()
    env = {**os.environ, "PGOLF_DEVICE": "cpu", "PGOLF_QUIET": "1"}
    log = work / "logs" / f"{preset}_s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    wall_s = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0 or not report_path.is_file():
        return {"preset": preset, "seed": seed, "error": f"exit {proc.returncode}; see {log}"}
    return result_row(preset, seed, steps, json.loads(report_path.read_text()), wall_s)


def train_one(
    work: Path, data: Path, preset: str, seed: int, steps: int, frontier: dict | None
) -> None:
    """One run in this process, through the library rather than the CLI (same stages)."""
    from pgolf.config import resolve_config
    from pgolf.dist import init_world, shutdown
    from pgolf.run import run_pipeline

    sets = [a for a in shrink(preset, steps, seed, frontier) if a != "--set"]
    sets.append(f"data.path={data}")
    world = init_world()
    try:
        run_pipeline(work / "runs" / f"{preset}_s{seed}", resolve_config(preset, sets), world)
    finally:
        shutdown(world)


def fmt(values: list, spec: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "not run"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, spec)  # the seeds column says it is one run
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{format(mean, spec)} ± {format(std, spec)}"


def markdown_table(rows: list[dict], presets: tuple[str, ...]) -> str:
    lines = [
        "| preset | seeds | steps | val_bpb pre-quant | val_bpb post-quant | val_bpb with TTT "
        "| bytes_total | train s | calib s | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for preset in presets:
        done = [r for r in rows if r["preset"] == preset and "error" not in r]
        if not done:
            lines.append(f"| `{preset}` | 0 | — | not run | not run | not run | — | — | — | — |")
            continue
        ttt = [r["ttt_val_bpb"] for r in done]
        lines.append(
            f"| `{preset}` | {len(done)} | {done[0]['steps']} "
            f"| {fmt([r['pre_quant_val_bpb'] for r in done], '.4f')} "
            f"| {fmt([r['post_quant_val_bpb'] for r in done], '.4f')} "
            f"| {fmt(ttt, '.4f') if any(v is not None for v in ttt) else 'TTT off in preset'} "
            f"| {fmt([r['bytes_total'] for r in done], ',.0f')} "
            f"| {fmt([r['train_time_s'] for r in done], '.0f')} "
            f"| {fmt([r['calib_time_s'] for r in done], '.0f')} "
            f"| {fmt([r['eval_time_s'] for r in done], '.0f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pgolf_reproduce_seeds"))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--only", default=",".join(PRESETS))
    parser.add_argument("--table", action="store_true", help="print the markdown table at the end")
    parser.add_argument(
        "--report", action="store_true", help="only tabulate finished runs; train nothing"
    )
    parser.add_argument(
        "--frontier",
        action="store_true",
        help=f"CaseOps SP8192 data and the frontier shape; --only defaults to {','.join(FRONTIER)}",
    )
    parser.add_argument("--layers", type=int, default=8, help="with --frontier (default 8)")
    parser.add_argument(
        "--max-val-tokens", type=int, default=20000, help="with --frontier (default 20000)"
    )
    parser.add_argument("--one", metavar="PRESET:SEED", help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    frontier = (
        {"layers": args.layers, "max_val_tokens": args.max_val_tokens} if args.frontier else None
    )
    shape_args = ["--layers", str(args.layers), "--max-val-tokens", str(args.max_val_tokens)]
    shape_args = ["--frontier", *shape_args] if args.frontier else []
    if args.one:
        preset, seed = args.one.rsplit(":", 1)
        data = data_dir(args.work, args.frontier)
        train_one(args.work, data, preset, int(seed), args.steps, frontier)
        return
    if args.frontier and args.only == ",".join(PRESETS):
        args.only = ",".join(FRONTIER)
    presets = tuple(args.only.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.report:
        rows = []
        for seed in seeds:
            for preset in presets:
                # Only finished runs: one in progress has a report without val_bpb.
                if (
                    report := rundir.finished_report(args.work / "runs" / f"{preset}_s{seed}")
                ) is not None:
                    rows.append(result_row(preset, seed, args.steps, report, None))
        for row in rows:
            print(json.dumps(row))
        print(markdown_table(rows, presets))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    build_data(args.work, caseops=args.frontier)
    rows = []
    for seed in seeds:
        for preset in presets:
            row = run_one(args.work, preset, seed, args.steps, shape_args)
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.work / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    if args.table:
        print(markdown_table(rows, presets))


if __name__ == "__main__":
    main()
