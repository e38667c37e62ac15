"""pgolf against the official scripts, timed side by side on one machine (issue #16 items 1, 5).

Each measure builds one workload for both sides (same shape, same tokens, same weights where a
model is involved, same thread count), then times them interleaved, pgolf then official, `--pairs`
times. One JSON line per pair, then one summary line with the median of the per-pair ratios
pgolf_s / official_s (below 1: pgolf is faster). The official side is the unmodified script
loaded through the parity tests' shim (`tests/parity/official.py`): on the CPU `torch.compile` is
the identity, FlashAttention is SDPA, and its bf16 casts in Muon run in fp32 as pgolf's do there.

Measures (4 layers × 128, 4 heads / 2 KV, seq 256, official sp1024 tokens from the dev shard):
  train_baseline  one optimizer step, 8,192 tokens (grad accum 8), Muon + Adam: pgolf's Trainer
                  step against the script's forward/backward and its main()'s optimizers
  train_pr1019    the same on the S1019 stack (banked Parallel Muon on the official side)
  sliding_eval    S1019's eval_val_sliding (T 256, stride 64) vs pgolf's evaluate, 16,384 targets
  ttt_chunk       S549's eval_val_sliding_ttt on one 8,192-token chunk (score, 3 SGD epochs) plus
                  the short last chunk (scored only), vs pgolf's evaluate with pr549's TTT
  gptq_512x1536   S1019's quantize_int6_gptq vs pgolf's quantize_matrix with pr1019's rule and
                  options, one 512×1536 matrix, Hessian of random activations (always on the CPU,
                  where both pipelines quantise)
  selfgen_calib   S1019's generate_autoregressive_calib vs pgolf's self_generated: 8 sequences ×
                  256 tokens, batch 8, temperature 0.8

    PGOLF_SHARED=../shared python benchmarks/vs_official.py [--pairs 5] [--threads 1]
        [--only train_pr1019 gptq_512x1536] [--device cpu|cuda] [--table]

`--device cuda` runs both sides in bf16 autocast with torch.compile where each pipeline compiles
(pgolf's Trainer; the official main()'s model and baseline Newton–Schulz, and the compile inside
its eval_val_sliding), the official weights in main()'s dtypes. Timing is time.perf_counter
around the work only, with torch.cuda.synchronize on CUDA; builds and weight resets are outside.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.parity

SEQ = 256
BATCH_TOKENS = 8192
STRIDE = 64
EVAL_TARGETS = 16384
TTT_CHUNK = 8192
GPTQ_SHAPE = (512, 1536)
SELFGEN = dict(count=8, length=256, batch=8, temperature=0.8, seed=1337)
QUIET = {"log0": lambda *args, **kwargs: None}
MEASURES = (
    "train_baseline",
    "train_pr1019",
    "sliding_eval",
    "ttt_chunk",
    "gptq_512x1536",
    "selfgen_calib",
)


@dataclass
class Bench:
    """Two workloads doing the same thing; `reset_*` run untimed before each timed call."""

    pgolf: Callable[[], object]
    official: Callable[[], object]
    reset_pgolf: Callable[[], None] = lambda: None
    reset_official: Callable[[], None] = lambda: None
    device: str = "cpu"
    per_call: int = 1  # units of work per call (train steps): times are divided by it
    note: str = ""
    agree: Callable[[object, object], dict] | None = None  # the two results, compared
    keep: list = field(default_factory=list)  # objects whose lifetime is the bench's


class Context:
    """What every measure shares: device, the world pgolf runs in, data, tables."""

    def __init__(self, device: str, tmp: Path, steps: int):
        from pgolf.data.shards import read_shard, write_shard
        from pgolf.data.tokenizer import build_byte_tables, load_tokenizer
        from pgolf.dist import World
        from pgolf.eval.bpb import TorchByteTables
        from pgolf.settings import shared_data

        self.device = torch.device(device)
        self.world = World(rank=0, world_size=1, local_rank=0, device=self.device)
        self.steps = steps
        shard = shared_data("corpus", "fineweb_pg_sp1024_dev_shard", "fineweb_train_000000.bin")
        tokenizer = shared_data("tokenizers", "fineweb_1024_bpe.model")
        tokens = np.asarray(read_shard(shard))
        # Training reads the shard from its start; evaluation takes a stream from its end.
        self.data = tmp / "data"
        self.data.mkdir()
        write_shard(self.data / "fineweb_train_000000.bin", tokens[: -(EVAL_TARGETS + 1)])
        write_shard(self.data / "fineweb_val_000000.bin", tokens[-(EVAL_TARGETS + 1) :])
        shutil.copy(tokenizer, self.data / "tokenizer.model")
        self.stream = tokens[-(EVAL_TARGETS + 1) :].astype(np.uint16)
        self.sp = load_tokenizer(tokenizer)
        self.tables = TorchByteTables(build_byte_tables(self.sp, 1024), self.device)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def official_compile(self):
        """The shim's identity compile on the CPU; the real one on CUDA."""
        from tests.parity.official import no_compile

        return contextlib.nullcontext() if self.cuda else no_compile()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda)


# -- models -----------------------------------------------------------------------------------
def official_and_pgolf(ctx: Context, preset: str, script: str, **env):
    """The script's GPT at the tiny shape (its own init, slightly perturbed so no weight is
    trivially zero) and pgolf's GPT holding the same weights; both on the device."""
    from pgolf.model.gpt import GPT
    from tests.parity.models import official_gpt, official_state_dict, to_upstream_precision
    from tests.parity.training import load_script, pgolf_config

    mod = load_script(script, TRAIN_SEQ_LEN=SEQ, EVAL_SEQ_LEN=SEQ, **env)
    torch.manual_seed(0)
    ref = official_gpt(mod).float()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = pgolf_config(preset)
    ours = GPT(cfg.model)
    ours.load_state_dict(official_state_dict(mod, ref))
    if not ctx.cuda:  # pgolf's CUDA precision modes would differ from fp32 on the CPU here
        check_same_logits(mod, ref, ours, ctx)
    ref.to(ctx.device)
    if ctx.cuda:
        to_upstream_precision(mod, ref)
    return mod, ref, ours.to(ctx.device), cfg


def check_same_logits(mod, ref, ours, ctx: Context) -> None:
    """Setup check, untimed: the two models really are one model (CPU, fp32)."""
    from tests.parity.models import official_logits

    ids = torch.from_numpy(ctx.stream[:SEQ].astype(np.int64))[None]
    with torch.no_grad():
        diff = (official_logits(mod, ref, ids) - ours(ids)).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"setup: official and pgolf logits differ by {diff:.3g}")


# -- training step ----------------------------------------------------------------------------
def _official_train_step(mod, model, optimizers, loader, accum: int, ctx: Context) -> None:
    """One step as the scripts' main() loop takes it (no EMA/SWA, as pgolf's step has none)."""
    from tests.parity.training import bf16_as_fp32

    a = mod.args
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    for _ in range(accum):
        x, y = loader.next_batch(BATCH_TOKENS, SEQ, accum)
        with ctx.autocast():
            loss = model(x, y)
        (loss * (1.0 / accum)).backward()
    warm = a.muon_momentum_warmup_steps
    momentum = a.muon_momentum_warmup_start if warm > 0 else a.muon_momentum
    for group in optimizers["muon"].param_groups:
        group["momentum"] = momentum
    for opt in optimizers.values():
        for group in opt.param_groups:
            group["lr"] = group["base_lr"]
    if a.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip_norm)
    # On the CPU the script's bf16 Newton–Schulz runs in fp32, as pgolf's Muon does there.
    with contextlib.nullcontext() if ctx.cuda else bf16_as_fp32(mod):
        if hasattr(optimizers["muon"], "launch_reduce_scatters"):
            optimizers["muon"].launch_reduce_scatters()  # banked: a no-op in one process
        for opt in optimizers.values():
            opt.step()


def bench_train(ctx: Context, preset: str, script: str) -> Bench:
    from pgolf.config import resolve_config
    from pgolf.data.dataset import resolve_dataset
    from pgolf.runlog import RunLog
    from pgolf.train.trainer import Trainer
    from tests.parity.models import official_state_dict
    from tests.parity.training import official_optimizers, pgolf_config

    mod, ref, _, _ = official_and_pgolf(ctx, preset, script)
    cfg = resolve_config(
        preset,
        [f"data.path={ctx.data}", f"train.train_seq_len={SEQ}",
         f"train.train_batch_tokens={BATCH_TOKENS}", "train.warmup_steps=0",
         "train.max_wallclock_seconds=0", "train.iterations=1000000"],
        environ={},
    )  # fmt: skip
    cfg.model = pgolf_config(preset).model
    run_dir = tempfile.TemporaryDirectory()
    trainer = Trainer(
        cfg, resolve_dataset(cfg.data), ctx.world, Path(run_dir.name), RunLog(run_dir.name, False)
    )
    trainer.model.load_state_dict(official_state_dict(mod, ref))
    if ctx.cuda:  # main() compiles the model, and the baseline its Newton–Schulz, before training
        if hasattr(mod, "zeropower_via_newtonschulz5") and script == "base":
            mod.zeropower_via_newtonschulz5 = torch.compile(mod.zeropower_via_newtonschulz5)
        model = torch.compile(ref, dynamic=False, fullgraph=True)
    else:
        model = ref
    optimizers = official_optimizers(mod, ref)
    loader = mod.DistributedTokenLoader(str(ctx.data / "fineweb_train_*.bin"), 0, 1, ctx.device)
    accum = 8  # main() at world size 1: 8 // world_size, 4 sequences per micro-step
    if trainer.accum != accum:
        raise SystemExit(f"setup: pgolf's {preset} accumulates {trainer.accum} micro-steps, not 8")

    def ours():
        for _ in range(ctx.steps):
            trainer._train_step(1.0)

    def theirs():
        for _ in range(ctx.steps):
            _official_train_step(mod, model, optimizers, loader, accum, ctx)

    return Bench(ours, theirs, device=str(ctx.device), per_call=ctx.steps,
                 keep=[run_dir, trainer])  # fmt: skip


# -- evaluation -------------------------------------------------------------------------------
def same_bpb(ours: dict, theirs: tuple) -> dict:
    """pgolf's evaluate result and an official (val_loss, val_bpb)."""
    return {"pgolf_bpb": round(ours["val_bpb"], 6), "official_bpb": round(theirs[1], 6)}


def official_luts(mod, ctx: Context):
    return mod.build_sentencepiece_luts(ctx.sp, 1024, ctx.device)


def bench_sliding(ctx: Context) -> Bench:
    from pgolf.config import load_preset
    from pgolf.eval.evaluate import evaluate

    mod, ref, ours, _ = official_and_pgolf(ctx, "pr1019", "s1019")
    cfg = load_preset("pr1019").eval
    cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_windows = SEQ, STRIDE, 32
    cfg.eval_time_cap_s, cfg.ttt_enabled = 0, False
    val = torch.from_numpy(ctx.stream.astype(np.int64))
    luts = official_luts(mod, ctx)

    def pgolf_eval():
        return evaluate(ours, ctx.stream, ctx.tables, cfg, ctx.world, train_seq_len=SEQ)

    def official_eval():
        with ctx.official_compile():
            return mod.eval_val_sliding(mod.args, ref, 0, 1, ctx.device, val, *luts,
                                        stride=STRIDE, batch_seqs=32, eval_seq_len=SEQ)  # fmt: skip

    note = "official rescores the tail: 256 windows to pgolf's 253"
    return Bench(pgolf_eval, official_eval, device=str(ctx.device), note=note, agree=same_bpb)


def bench_ttt(ctx: Context) -> Bench:
    from pgolf.config import load_preset
    from pgolf.eval.evaluate import evaluate

    cfg = load_preset("pr549").eval
    cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_windows = SEQ, STRIDE, 32
    cfg.ttt_chunk_tokens, cfg.eval_time_cap_s, cfg.ttt_score_baseline = TTT_CHUNK, 0, False
    env = dict(
        TTT_ENABLED=1,
        TTT_LR=cfg.ttt_lr,
        TTT_EPOCHS=cfg.ttt_epochs,
        TTT_CHUNK_TOKENS=TTT_CHUNK,
        TTT_FREEZE_BLOCKS=cfg.ttt_freeze_blocks,
        TTT_MOMENTUM=cfg.ttt_momentum,
        TTT_BATCH_SEQS=cfg.ttt_batch_seqs,
        TTT_GRAD_CLIP=cfg.ttt_grad_clip,
    )
    mod, ref, ours, _ = official_and_pgolf(ctx, "pr549", "s549", **env)
    # One trained chunk, then a last chunk of one window that is only scored.
    tokens = ctx.stream[: TTT_CHUNK + STRIDE + 1]
    val = torch.from_numpy(tokens.astype(np.int64))
    luts = official_luts(mod, ctx)
    start_ref = {k: v.clone() for k, v in ref.state_dict().items()}
    start_ours = {k: v.clone() for k, v in ours.state_dict().items()}
    # RoPE tables first built under inference_mode could not be saved for backward: build them
    # outside it, as the bf16 autocast's copies make unnecessary on CUDA.
    with torch.no_grad(), ctx.autocast():
        ref.forward_logits(val[None, :SEQ].to(ctx.device))

    def pgolf_ttt():
        return evaluate(ours, tokens, ctx.tables, cfg, ctx.world, train_seq_len=SEQ)

    def official_ttt():
        with ctx.official_compile():
            return mod.eval_val_sliding_ttt(mod.args, ref, 0, 1, ctx.device, val, *luts,
                                            stride=STRIDE, batch_seqs=32, **QUIET)  # fmt: skip

    return Bench(
        pgolf_ttt,
        official_ttt,
        reset_pgolf=lambda: ours.load_state_dict(start_ours),
        reset_official=lambda: ref.load_state_dict(start_ref),
        device=str(ctx.device),
        note="pgolf's evaluate also puts the adapted weights back",
        agree=same_bpb,
    )


# -- quantisation -----------------------------------------------------------------------------
def bench_gptq(ctx: Context) -> Bench:
    from pgolf.config import load_preset
    from pgolf.quant.gptq import quantize_matrix
    from pgolf.quant.policy import class_bits, clip_rule, gptq_options
    from tests.parity.official import load_official

    mod = load_official("s1019")
    rows, cols = GPTQ_SHAPE
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    x = torch.randn(4 * cols, cols, generator=gen)
    x[:, :16] *= 8  # a few hot channels, as real activations have
    h = x.T @ x / x.shape[0]
    # S1019 adds 1 % at collection and 1 % more in its solver; pgolf's preset damping is the sum.
    h_collected = h + 0.01 * torch.diag(h).mean() * torch.eye(cols)
    ex = load_preset("pr1019").quant
    bits, rule, opts = class_bits(ex, "mlp"), clip_rule(ex, "mlp"), gptq_options(ex)

    def ours():
        return quantize_matrix(w, h, bits, rule, opts)

    def theirs():
        return mod.quantize_int6_gptq(w, hessian=h_collected, clip_range=31)

    def agree(o, t) -> dict:
        return {"integers_differing": int((o[0] != t[0]).sum()), "of": o[0].numel()}

    note = "both pipelines quantise on the CPU"
    return Bench(ours, theirs, device="cpu", note=note, agree=agree)


def bench_selfgen(ctx: Context) -> Bench:
    from pgolf.quant.calibration import self_generated

    mod, ref, ours, _ = official_and_pgolf(ctx, "pr1019", "s1019")
    s = SELFGEN

    def pgolf_gen():
        return list(
            self_generated(ours, s["count"], s["length"], vocab_size=1024,
                           temperature=s["temperature"], seed=s["seed"], batch_size=s["batch"],
                           context=0, device=ctx.device)
        )  # fmt: skip

    def official_gen():
        return mod.generate_autoregressive_calib(
            ref, ctx.device, num_seqs=s["count"], seq_len=s["length"], vocab_size=1024,
            temperature=s["temperature"], batch_size=s["batch"], seed=s["seed"],
        )  # fmt: skip

    def agree(o, t) -> dict:
        return {"same_tokens": bool(torch.equal(torch.cat(o).cpu(), torch.cat(t).cpu()))}

    return Bench(pgolf_gen, official_gen, device=str(ctx.device), agree=agree)


BUILDERS: dict[str, Callable[[Context], Bench]] = {
    "train_baseline": lambda ctx: bench_train(ctx, "baseline", "base"),
    "train_pr1019": lambda ctx: bench_train(ctx, "pr1019", "s1019"),
    "sliding_eval": bench_sliding,
    "ttt_chunk": bench_ttt,
    "gptq_512x1536": bench_gptq,
    "selfgen_calib": bench_selfgen,
}


# -- timing -----------------------------------------------------------------------------------
def timed(work: Callable[[], object], reset: Callable[[], None], ctx: Context):
    """(seconds, result) of one call; the reset before it is not timed."""
    reset()
    ctx.sync()
    t0 = time.perf_counter()
    result = work()
    ctx.sync()
    return time.perf_counter() - t0, result


def run_measure(name: str, ctx: Context, pairs: int, warmup: int, threads: int) -> dict:
    bench = BUILDERS[name](ctx)
    for _ in range(warmup):  # compile, caches, allocator: untimed
        timed(bench.pgolf, bench.reset_pgolf, ctx)
        timed(bench.official, bench.reset_official, ctx)
    ratios, ours_s, theirs_s = [], [], []
    for i in range(pairs):
        ours, ours_result = timed(bench.pgolf, bench.reset_pgolf, ctx)
        theirs, theirs_result = timed(bench.official, bench.reset_official, ctx)
        ours, theirs = ours / bench.per_call, theirs / bench.per_call
        ours_s.append(ours)
        theirs_s.append(theirs)
        ratios.append(ours / theirs)
        line = {"benchmark": "vs_official", "measure": name, "pgolf_s": round(ours, 4),
                "official_s": round(theirs, 4), "pair": i}  # fmt: skip
        print(json.dumps(line), flush=True)
    summary = {
        "benchmark": "vs_official",
        "measure": name,
        "ratio_median": round(statistics.median(ratios), 3),
        "pgolf_median_s": round(statistics.median(ours_s), 4),
        "official_median_s": round(statistics.median(theirs_s), 4),
        "pairs": pairs,
        "threads": threads,
        "device": bench.device,
    }
    if bench.agree is not None:  # the last pair's results: both sides did the same work
        summary["check"] = bench.agree(ours_result, theirs_result)
    if bench.note:
        summary["note"] = bench.note
    print(json.dumps(summary), flush=True)
    return summary


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| measure | pgolf s | official s | pgolf / official (median of pairs) | pairs | device |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['measure']} | {r['pgolf_median_s']:.4g} | {r['official_median_s']:.4g} | "
            f"{r['ratio_median']:.2f} | {r['pairs']} | {r['device']} |"
        )
    return "\n".join(lines)


def require_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        build = torch.version.cuda or "none (a CPU-only build)"
        raise SystemExit(
            f"--device cuda: CUDA is not available here (torch {torch.__version__}, CUDA "
            f"{build}, {torch.cuda.device_count()} GPUs visible). Run on a GPU machine with a "
            "CUDA build of torch, or use --device cpu."
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5, help="timed pgolf/official pairs (≥ 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    parser.add_argument("--only", nargs="+", choices=MEASURES, metavar="NAME",
                        help=f"measures to run (default all): {', '.join(MEASURES)}")  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=2, help="training steps per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each side first")
    parser.add_argument("--table", action="store_true", help="also print a markdown table")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.threads < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--pairs, --threads and --steps must be ≥ 1, --warmup ≥ 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_device(args.device)
    os.environ["PGOLF_DEVICE"] = args.device  # pgolf's precision modes follow this device
    # The scripts' CUDA autocast, disabled on the CPU, warns once per call.
    warnings.filterwarnings("ignore", message="CUDA is not available", category=UserWarning)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(args.device, Path(tmp), args.steps)
        for name in args.only or MEASURES:
            rows.append(run_measure(name, ctx, args.pairs, args.warmup, args.threads))
    if args.table:
        print(markdown_table(rows))


if __name__ == "__main__":
    main()
