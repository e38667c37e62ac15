"""Quantisation error of RTN, GPTQ-lite and the GPTQ variants on trained weights; quant gap.

    python benchmarks/gptq_error.py                      # trains a demo-sized model (~90 s)
    python benchmarks/gptq_error.py --run RUN            # weights of `pgolf run` (demo preset)

Prints JSON lines. Per bit width and method, averaged over every 2-D block matrix:
- `hessian_rel_err`: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with H from the calibration tokens;
- `heldout_rel_err`: the same with H from other (held-out) tokens, i.e. the output error the
  layer really makes on inputs GPTQ did not see;
- `entropy_bits_per_param`: order-0 entropy of the integers, i.e. what they cost packed; compare
  errors at equal cost (SDClip's wide clip buys fewer bits with more error, by design);
- `s_per_matrix`: wall seconds per matrix (CPU).
Then the quant gap (BPB after − before) of whole-model exports. Without --run the model is
trained here on the shared dev shard (training tokens); calibration uses its first tokens and the
gap is measured on its last 60k tokens, which training never saw.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pgolf.artifact import rans
from pgolf.artifact.config import ExportConfig
from pgolf.artifact.container import pack_artifact, pack_sections, unpack_artifact
from pgolf.artifact.int8 import quantize_state_dict_int8
from pgolf.config import config_from_dict, load_preset
from pgolf.data.shards import load_tokens, read_shard
from pgolf.data.tokenizer import build_byte_tables, load_tokenizer
from pgolf.dist import current_world
from pgolf.eval.bpb import TorchByteTables
from pgolf.eval.score import score_nonoverlapping
from pgolf.model.gpt import GPT
from pgolf.quant.export import dequantize_artifact, quantize_model
from pgolf.quant.gptq import ClipRule, GPTQOptions, hessian_error, quantize_matrix
from pgolf.quant.grid import dequantize
from pgolf.quant.hessian import collect_hessians
from pgolf.settings import shared_data

DEV_SHARD = shared_data("corpus", "fineweb_pg_sp1024_dev_shard", "fineweb_train_000000.bin")
TOKENIZER = shared_data("tokenizers", "fineweb_1024_bpe.model")
HELD_OUT = 60_000

METHODS = {  # name -> (clip rule, GPTQ options or None)
    "rtn_rowmax": (ClipRule("rowmax"), None),
    "gptq_lite": (ClipRule("search"), None),
    "gptq_natural": (ClipRule("search"), GPTQOptions(order="natural")),
    "gptq_act_order": (ClipRule("search"), GPTQOptions(order="desc")),
    "raw_inverse_natural_p610": (ClipRule("search"), GPTQOptions(order="natural", feedback="raw")),
    "raw_inverse_asc_p578": (ClipRule("search"), GPTQOptions(order="asc", feedback="raw")),
    "gptq_5cand_s1019": (ClipRule("search-gptq"), GPTQOptions(order="desc")),
    "rtn_sdclip": (ClipRule("sdclip", sigmas=12.85), None),
    "gptq_sdclip_s1394": (ClipRule("sdclip", sigmas=12.85), GPTQOptions(order="desc")),
}


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def train_demo(tokens: np.ndarray, seconds: float, seed: int = 0) -> GPT:
    cfg = load_preset("demo").model
    torch.manual_seed(seed)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(seed)
    seq, batch = 128, 16
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        starts = rng.integers(0, len(tokens) - seq - 1, batch)
        chunk = np.stack([tokens[s : s + seq + 1] for s in starts]).astype(np.int64)
        x, y = torch.from_numpy(chunk[:, :-1]), torch.from_numpy(chunk[:, 1:])
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    emit(
        bench="train_demo",
        steps=step,
        seconds=round(time.perf_counter() - t0, 1),
        final_loss=round(loss.item(), 4),
    )
    return model


def batches(tokens: np.ndarray, n: int, seq: int, start: int = 0) -> list[torch.Tensor]:
    chunk = np.asarray(tokens[start : start + n * seq], dtype=np.int64)
    return list(torch.from_numpy(chunk).reshape(-1, 8 if n >= 8 else n, seq))


def bpb(model: GPT, tokens: np.ndarray, tables: TorchByteTables, seq: int) -> float:
    return score_nonoverlapping(model, tokens, seq, 65536, tables, current_world()).bpb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="run directory with config.json + model.safetensors")
    ap.add_argument("--train-seconds", type=float, default=90.0)
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--bits", default="5,6,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=131072, help="0 = all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.run:
        from safetensors.torch import load_file

        from pgolf.data.dataset import resolve_dataset

        cfg = config_from_dict(json.loads((args.run / "config.json").read_text()))
        model = GPT(cfg.model)
        model.load_state_dict(load_file(args.run / "model.safetensors"))
        files = resolve_dataset(cfg.data)
        train_tokens = load_tokens(files.train[:1])
        eval_tokens = load_tokens(files.val)
        tokenizer = files.tokenizer
        seq = cfg.eval.eval_seq_len or cfg.train.train_seq_len
    else:
        all_tokens = np.asarray(read_shard(DEV_SHARD))
        train_tokens, eval_tokens = all_tokens[:-HELD_OUT], all_tokens[-HELD_OUT:]
        model = train_demo(train_tokens, args.train_seconds)
        tokenizer, seq = TOKENIZER, 256
    model.eval()
    if args.eval_tokens:
        eval_tokens = eval_tokens[: args.eval_tokens + 1]
    vocab = model.cfg.vocab_size
    tables = TorchByteTables(build_byte_tables(load_tokenizer(tokenizer), vocab))

    # Calibration from the first training tokens; "held-out" Hessians from tokens further on.
    t0 = time.perf_counter()
    calib = collect_hessians(model, batches(train_tokens, args.calib_seqs, seq))
    calib_s = time.perf_counter() - t0
    held = collect_hessians(model, batches(train_tokens, 64, seq, start=len(train_tokens) // 2))
    emit(
        bench="calibration",
        seqs=args.calib_seqs,
        seq_len=seq,
        seconds=round(calib_s, 2),
        hessians=len(calib),
    )

    params = dict(model.named_parameters())
    weights = {n: params[n].detach().float() for n in calib if n.startswith("blocks.")}
    for bits in map(int, args.bits.split(",")):
        base = None
        for method, (rule, opts) in METHODS.items():
            h_err, o_err, secs, ent_bytes, numel = [], [], [], 0.0, 0
            for name, w in weights.items():
                q, s, st = quantize_matrix(w, calib[name], bits, rule, opts)
                h_err.append(st["hessian_error"])
                o_err.append(hessian_error(w, dequantize(q, s), held[name]))
                secs.append(st["seconds"])
                ent_bytes += rans.entropy_bytes(q.numpy())
                numel += q.numel()
                if st.get("fallback"):
                    emit(bench="gptq_fallback", name=name, method=method, why=st["fallback"])
            row = {
                "hessian_rel_err": float(np.mean(h_err)),
                "heldout_rel_err": float(np.mean(o_err)),
            }
            base = base or row
            emit(
                bench="gptq_error",
                bits=bits,
                method=method,
                matrices=len(weights),
                hessian_rel_err=round(row["hessian_rel_err"], 6),
                heldout_rel_err=round(row["heldout_rel_err"], 6),
                heldout_vs_rtn=round(row["heldout_rel_err"] / base["heldout_rel_err"], 3),
                entropy_bits_per_param=round(8 * ent_bytes / numel, 3),
                s_per_matrix=round(float(np.mean(secs)), 4),
            )

    # Quant gap: whole-model exports. The demo's matrices are ≤ 65,536 elements, which the record
    # rule would keep fp16, so every matrix is quantised here (keep_float_max_numel=0).
    before = bpb(model, eval_tokens, tables, seq)
    emit(bench="quant_gap", export="float", bpb=round(before, 5))
    arrays, meta = quantize_state_dict_int8(model.state_dict())
    data = pack_artifact(arrays, meta, codec="zlib")
    gaps = [("rtn_int8_official", data, None)]
    for label, bits, method in [
        ("rtn_int6", 6, "rtn"),
        ("gptq_int6", 6, "gptq"),
        ("gptq_int5", 5, "gptq"),
    ]:
        ex = ExportConfig(
            codec="mixed", quant_method=method, matrix_bits=bits, keep_float_max_numel=0
        )
        qm = quantize_model(model, ex, calib)
        gaps.append((label, pack_sections(qm.arrays, qm.meta).data, None))
    for label, data, _ in gaps:
        state = dequantize_artifact(*unpack_artifact(data))
        restored = GPT(model.cfg)
        restored.load_state_dict(state)
        after = bpb(restored, eval_tokens, tables, seq)
        emit(
            bench="quant_gap",
            export=label,
            bytes=len(data),
            bpb=round(after, 5),
            gap=round(after - before, 5),
        )


if __name__ == "__main__":
    main()
