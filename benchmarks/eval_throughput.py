"""Evaluation throughput: scored targets/s of the non-overlapping and sliding passes, TTT s/chunk.

Prints one JSON object per line. Shape: the demo model (4 layers × 128, vocab 1024, window 256),
freshly initialised (throughput does not depend on the weights), on official sp1024 tokens from
the shared dev shard. Sliding at stride 64 runs every position through 4 windows, so it costs
about T/s = 4× the forward work per scored target of the non-overlapping pass. Wall-clock rates
swing with other load on a shared machine; the `*_per_cpu_s` rates (process CPU time) do less.

    python benchmarks/eval_throughput.py [--tokens 16384] [--stride 64] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from pgolf.data.shards import read_shard
from pgolf.data.tokenizer import build_byte_tables, load_tokenizer
from pgolf.dist import World
from pgolf.eval.bpb import TorchByteTables
from pgolf.eval.config import EvalConfig
from pgolf.eval.evaluate import evaluate
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT
from pgolf.settings import shared_data

SEQ_LEN = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16_384, help="targets in the stream")
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--batch-windows", type=int, default=32)
    parser.add_argument("--chunk-tokens", type=int, default=4096)
    parser.add_argument("--ttt-epochs", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()

    device = torch.device(args.device)
    world = World(rank=0, world_size=1, local_rank=0, device=device)
    shard = shared_data("corpus", "fineweb_pg_sp1024_dev_shard", "fineweb_train_000000.bin")
    tokens = np.asarray(read_shard(shard))[-(args.tokens + 1) :]
    sp = load_tokenizer(shared_data("tokenizers", "fineweb_1024_bpe.model"))
    tables = TorchByteTables(build_byte_tables(sp, 1024), device)
    torch.manual_seed(0)
    heads = max(args.dim // 32, 1)
    cfg = ModelConfig(
        num_layers=args.layers, model_dim=args.dim, num_heads=heads, num_kv_heads=max(heads // 2, 1)
    )
    model = GPT(cfg).to(device)
    common = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "model": f"{args.layers}x{args.dim}",
        "seq_len": SEQ_LEN,
        "targets": args.tokens,
    }

    def run(**settings) -> dict:
        eval_cfg = EvalConfig(eval_seq_len=SEQ_LEN, eval_time_cap_s=0.0, **settings)
        cpu0 = time.process_time()
        result = evaluate(model, tokens, tables, eval_cfg, world, train_seq_len=SEQ_LEN)
        result["cpu_s"] = time.process_time() - cpu0
        return result

    run(eval_mode="sliding", eval_stride=SEQ_LEN)  # warm-up: allocator, RoPE tables, kernels
    plain = run(val_batch_tokens=args.batch_windows * SEQ_LEN)
    sliding = run(
        eval_mode="sliding", eval_stride=args.stride, eval_batch_windows=args.batch_windows
    )
    for name, r, stride in (
        ("nonoverlapping", plain, SEQ_LEN),
        ("sliding", sliding, args.stride),
    ):
        seconds = r["time"]["score_s"]
        line = {
            "bench": f"eval_{name}",
            **common,
            "stride": stride,
            "windows": r["windows"],
            "scored": r["val_tokens"],
            "seconds": round(seconds, 3),
            "scored_tokens_per_s": round(r["val_tokens"] / seconds, 1),
            "scored_tokens_per_cpu_s": round(r["val_tokens"] / r["cpu_s"], 1),
            "forward_tokens_per_s": round(r["windows"] * SEQ_LEN / seconds, 1),
            "val_bpb": round(r["val_bpb"], 4),
        }
        print(json.dumps(line), flush=True)
    ttt = run(
        eval_mode="sliding",
        eval_stride=args.stride,
        eval_batch_windows=args.batch_windows,
        ttt_enabled=True,
        ttt_chunk_tokens=args.chunk_tokens,
        ttt_epochs=args.ttt_epochs,
    )
    summary = ttt["ttt"]
    line = {
        "bench": "ttt_sgd",
        **common,
        "stride": args.stride,
        "chunk_tokens": args.chunk_tokens,
        "epochs": args.ttt_epochs,
        "chunks": summary["chunks_scored"],
        "chunks_trained": summary["chunks_trained"],
        "score_s_per_chunk": round(summary["chunk_score_s_mean"], 3),
        "train_s_per_chunk": round(summary["chunk_train_s_mean"], 3),
        "total_s": round(ttt["time"]["total_s"], 3),
        "cpu_s_per_chunk": round(ttt["cpu_s"] / summary["chunks_scored"], 3),
        "train_tokens_per_s": round(
            args.chunk_tokens * args.ttt_epochs / max(summary["chunk_train_s_mean"], 1e-9), 1
        ),
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
