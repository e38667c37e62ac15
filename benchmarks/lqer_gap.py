"""What LQER (export.lqer, SPEC §5.19, §5.31) buys: quant gap and bytes with and without it.

    python benchmarks/lqer_gap.py --threads 1            # trains a demo-sized model (~120 s)
    python benchmarks/lqer_gap.py --run RUN              # weights of `pgolf run` (demo preset)

Exports one trained model under TOP's export settings (int6 GPTQ matrices with per-role SDClip
11.5 / 13 / 12.85, the int7 embedding at 14σ) without LQER, with TOP's LQER (rank 4 on the three
matrices with the largest ‖W − deq(Q)‖_F, factors int2/int4 asymmetric), with symmetric int4
factors, with the correction on every matrix, and the same at int5. Per variant one JSON line:
artifact bytes (pgolf's container, best codec per section) and the part of them that is LQER
factors, BPB after the round trip, the gap to the float model, and how much of ‖E‖_F the
corrected matrices kept (with exact and with quantised factors). The demo's matrices are
≤ 65,536 elements, which the record rule keeps fp16, so every matrix is quantised here
(keep_float_max_numel=0). Model, data and calibration as benchmarks/gptq_error.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from gptq_error import DEV_SHARD, HELD_OUT, TOKENIZER, batches, bpb, emit, train_demo

from pgolf.artifact.config import ExportConfig
from pgolf.artifact.container import pack_sections, unpack_artifact
from pgolf.config import config_from_dict
from pgolf.data.shards import load_tokens, read_shard
from pgolf.data.tokenizer import build_byte_tables, load_tokenizer
from pgolf.eval.bpb import TorchByteTables
from pgolf.model.gpt import GPT
from pgolf.quant.export import dequantize_artifact, quantize_model
from pgolf.quant.fit import artifact_report
from pgolf.quant.hessian import collect_hessians

TOP = ExportConfig(
    codec="mixed",
    matrix_bits=6,
    embed_bits=7,
    mlp_clip_sigmas=11.5,
    attn_clip_sigmas=13.0,
    embed_clip_sigmas=14.0,
    keep_float_max_numel=0,
)
VARIANTS = {  # name -> changes to TOP
    "int6": {},
    "int6+lqer": {"lqer": True},
    "int6+lqer_sym4": {"lqer": True, "lqer_asymmetric": False},
    "int6+lqer_all": {"lqer": True, "lqer_top_k": 1000},
    "int5": {"matrix_bits": 5},
    "int5+lqer": {"matrix_bits": 5, "lqer": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="run directory with config.json + model.safetensors")
    ap.add_argument("--train-seconds", type=float, default=120.0)
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-tokens", type=int, default=131072, help="0 = all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = {v: dataclasses.replace(TOP, **VARIANTS[v]) for v in args.variants.split(",")}

    if args.run:
        from safetensors.torch import load_file

        from pgolf.data.dataset import resolve_dataset

        cfg = config_from_dict(json.loads((args.run / "config.json").read_text()))
        model = GPT(cfg.model)
        model.load_state_dict(load_file(args.run / "model.safetensors"))
        files = resolve_dataset(cfg.data)
        train_tokens, eval_tokens = load_tokens(files.train[:1]), load_tokens(files.val)
        tokenizer, seq = files.tokenizer, cfg.eval.eval_seq_len or cfg.train.train_seq_len
    else:
        all_tokens = np.asarray(read_shard(DEV_SHARD))
        train_tokens, eval_tokens = all_tokens[:-HELD_OUT], all_tokens[-HELD_OUT:]
        model = train_demo(train_tokens, args.train_seconds)
        tokenizer, seq = TOKENIZER, 256
    model.eval()
    if args.eval_tokens:
        eval_tokens = eval_tokens[: args.eval_tokens + 1]
    tables = TorchByteTables(build_byte_tables(load_tokenizer(tokenizer), model.cfg.vocab_size))
    calib = collect_hessians(model, batches(train_tokens, args.calib_seqs, seq))
    before = bpb(model, eval_tokens, tables, seq)
    emit(bench="lqer_gap", export="float", bpb=round(before, 5), eval_tokens=len(eval_tokens) - 1)

    for label, export in variants.items():
        qm = quantize_model(model, export, calib)
        packed = pack_sections(qm.arrays, qm.meta)
        restored = GPT(model.cfg)
        restored.load_state_dict(dequantize_artifact(*unpack_artifact(packed.data)))
        after = bpb(restored, eval_tokens, tables, seq)
        fixes = [st["lqer"] for st in qm.stats.values() if "lqer" in st]
        kept = {}
        if fixes:
            e2 = sum(f["error_norm"] ** 2 for f in fixes)
            for key in ("error_norm_exact_factors", "error_norm_corrected"):
                kept[key.removeprefix("error_norm_")] = round(
                    (sum(f[key] ** 2 for f in fixes) / e2) ** 0.5, 4
                )
        emit(
            bench="lqer_gap",
            export=label,
            bytes=len(packed.data),
            lqer_bytes=artifact_report(qm, packed, {})["bytes_per_class"].get("lqer", 0),
            corrected=len(fixes),
            error_kept=kept or None,
            bpb=round(after, 5),
            gap=round(after - before, 5),
        )


if __name__ == "__main__":
    main()
