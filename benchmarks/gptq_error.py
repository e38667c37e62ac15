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
Then the quant gap (BPB after − before) of whole-model quantization. Without --run the model is
trained here on the shared dev shard (training tokens); calibration uses its first tokens and the
gap is measured on its last 60k tokens, which training never saw.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tiny_model import add_model_arguments, emit, model_under_test

from pgolf.artifact import rans
from pgolf.artifact.container import pack_artifact, pack_sections
from pgolf.artifact.int8 import quantize_state_dict_int8
from pgolf.quant.config import QuantConfig
from pgolf.quant.gptq import ClipRule, GPTQOptions, hessian_error, quantize_matrix
from pgolf.quant.grid import dequantize
from pgolf.quant.quantize import quantize_model

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(ap, train_seconds=90.0, threads=2)
    ap.add_argument("--bits", default="5,6,8")
    args = ap.parse_args()
    tiny = model_under_test(args)
    model, seq = tiny.model, tiny.seq

    # Calibration from the first training tokens; "held-out" Hessians from tokens further on.
    t0 = time.perf_counter()
    calib = tiny.hessians(args.calib_seqs)
    calib_s = time.perf_counter() - t0
    held = tiny.hessians(64, start=len(tiny.train_tokens) // 2)
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

    # Quant gap: whole models quantized. The demo's matrices are ≤ 65,536 elements, which the record
    # rule would keep fp16, so every matrix is quantised here (keep_float_max_numel=0).
    before = tiny.bpb()
    emit(bench="quant_gap", quant="float", bpb=round(before, 5))
    arrays, meta = quantize_state_dict_int8(model.state_dict())
    data = pack_artifact(arrays, meta, codec="zlib")
    gaps = [("rtn_int8_official", data, None)]
    for label, bits, method in [
        ("rtn_int6", 6, "rtn"),
        ("gptq_int6", 6, "gptq"),
        ("gptq_int5", 5, "gptq"),
    ]:
        ex = QuantConfig(
            codec="mixed", quant_method=method, matrix_bits=bits, keep_float_max_numel=0
        )
        qm = quantize_model(model, ex, calib)
        gaps.append((label, pack_sections(qm.arrays, qm.meta).data, None))
    for label, data, _ in gaps:
        after = tiny.round_trip_bpb(data)
        emit(
            bench="quant_gap",
            quant=label,
            bytes=len(data),
            bpb=round(after, 5),
            gap=round(after - before, 5),
        )


if __name__ == "__main__":
    main()
