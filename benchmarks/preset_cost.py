"""Forward+backward cost of each preset and of each technique alone, relative to the baseline.

Prints one JSON object per line. Every model is shrunk to the same CPU shape: 4 layers × 128,
2 heads (head dim 64, as the records, so partial RoPE keeps its 16/64), GQA 2:1 unless the preset
is MHA, each preset's vocabulary, bigram/VE dims scaled by 128/512, and a loop over the U-Net
bottleneck (layers L/2−1..L/2, which is 4..5 at 11 layers). Steps are interleaved across models
in rounds (one fwd+bwd of each model per round) so machine load drifts hit all of them alike;
the figure is the median over rounds, and the ratio is taken within this one process.

    python benchmarks/preset_cost.py [--rounds 9] [--warmup 2] [--threads 1] [--batch 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from pgolf.config import ModelConfig, load_preset
from pgolf.model.gpt import GPT, count_parameters

PRESETS = ["pr414", "pr549", "pr1019", "pr1060", "pr1413"]
PRESETS += ["seed-p639", "seed-p610", "seed-p1004", "seed-p578", "seed-p1351"]
TECHNIQUES = {
    "mlp3x": dict(mlp_mult=3.0),
    "mha": dict(num_kv_heads=2),
    "xsa_all": dict(xsa_last_n=-1),
    "smear_v1": dict(smear_gate="v1"),
    "smear_v2": dict(smear_gate="v2"),
    "bigram_2048x32": dict(bigram_vocab_size=2048, bigram_dim=32),
    "value_embeddings": dict(ve_enabled=True, ve_dim=32, ve_layers="-2,-1"),
    "partial_rope_16": dict(rope_dims=16, rope_train_seq_len=128),  # NTK rescale on at 256
    "ln_scale": dict(ln_scale=True),
    "leaky_relu2": dict(mlp_leaky_slope=0.5),
    "vrl": dict(value_residual=True),
    "attn_out_gate": dict(attn_out_gate=True),
    "doc_masked_attention": dict(doc_masked_attention=True),
    "skip_gates": dict(skip_gates=True),
    "recurrence_x2": dict(num_loops=2, loop_start=1, loop_end=2),
    "parallel_residuals": dict(parallel_residual_start=-2),
}


def shrink(model: ModelConfig, layers: int = 4, width: int = 128) -> ModelConfig:
    mha = model.num_kv_heads == model.num_heads
    scale = width / model.model_dim
    changes = dict(num_layers=layers, model_dim=width, num_heads=2, num_kv_heads=2 if mha else 1)
    changes.update(
        bigram_dim=max(1, round(model.bigram_dim * scale)),
        ve_dim=max(1, round(model.ve_dim * scale)),
    )
    if model.num_loops:
        changes.update(loop_start=layers // 2 - 1, loop_end=layers // 2)
    return dataclasses.replace(model, **changes)


def fwd_bwd_ms(model: GPT, x: torch.Tensor, y: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    model.loss(x, y).backward()
    return 1000 * (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = shrink(load_preset("baseline").model)
    configs: dict[tuple[str, str], ModelConfig] = {("baseline", "baseline"): base}
    for name, changes in TECHNIQUES.items():
        configs[("technique", name)] = dataclasses.replace(base, **changes)
    for name in PRESETS:
        configs[("preset", name)] = shrink(load_preset(name).model)
    models = {}
    for key, cfg in configs.items():
        torch.manual_seed(0)
        models[key] = GPT(cfg)
    gen = torch.Generator().manual_seed(0)
    data = {}
    for key, cfg in configs.items():
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        data[key] = (ids[:, :-1], ids[:, 1:])
    times: dict[tuple[str, str], list[float]] = {key: [] for key in configs}
    for r in range(args.warmup + args.rounds):
        for key, model in models.items():
            ms = fwd_bwd_ms(model, *data[key])
            if r >= args.warmup:
                times[key].append(ms)
    base_ms = statistics.median(times[("baseline", "baseline")])
    for (kind, name), samples in times.items():
        ms = statistics.median(samples)
        record = {
            "benchmark": "preset_cost",
            "kind": kind,
            "name": name,
            "shape": f"{configs[(kind, name)].num_layers}x128 seq{args.seq} batch{args.batch}",
            "vocab": configs[(kind, name)].vocab_size,
            "params": count_parameters(models[(kind, name)]),
            "ms_fwd_bwd": round(ms, 2),
            "relative_to_baseline": round(ms / base_ms, 3),
            "rounds": args.rounds,
            "threads": args.threads,
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
