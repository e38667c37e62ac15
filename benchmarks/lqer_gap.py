"""What LQER (quant.lqer, SPEC §5.19, §5.31) buys: quant gap and bytes with and without it.

    python benchmarks/lqer_gap.py --threads 1            # trains a demo-sized model (~120 s)
    python benchmarks/lqer_gap.py --run RUN              # weights of `pgolf run` (demo preset)

Quantizes one trained model under TOP's quant settings (int6 GPTQ matrices with per-role SDClip
11.5 / 13 / 12.85, the int7 embedding at 14σ) without LQER, with TOP's LQER (rank 4 on the three
matrices with the largest ‖W − deq(Q)‖_F, factors int2/int4 asymmetric), with symmetric int4
factors, with the correction on every matrix, and the same at int5. Per variant one JSON line:
artifact bytes (pgolf's container, best codec per section) and the part of them that is LQER
factors, BPB after the round trip, the gap to the float model, and how much of ‖E‖_F the
corrected matrices kept (with exact and with quantised factors). The demo's matrices are
≤ 65,536 elements, which the record rule keeps fp16, so every matrix is quantised here
(keep_float_max_numel=0). Model, data and calibration: benchmarks/tiny_model.py.
"""

from __future__ import annotations

import argparse
import dataclasses

from tiny_model import add_model_arguments, emit, model_under_test

from pgolf.artifact.container import pack_sections
from pgolf.quant.config import QuantConfig
from pgolf.quant.fit import artifact_report
from pgolf.quant.quantize import quantize_model

TOP = QuantConfig(
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
    add_model_arguments(ap, train_seconds=120.0, threads=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    variants = {v: dataclasses.replace(TOP, **VARIANTS[v]) for v in args.variants.split(",")}

    tiny = model_under_test(args)
    calib = tiny.hessians(args.calib_seqs)
    before = tiny.bpb()
    emit(
        bench="lqer_gap",
        quant="float",
        bpb=round(before, 5),
        eval_tokens=len(tiny.eval_tokens) - 1,
    )

    for label, quant in variants.items():
        qm = quantize_model(tiny.model, quant, calib)
        packed = pack_sections(qm.arrays, qm.meta)
        after = tiny.round_trip_bpb(packed.data)
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
            quant=label,
            bytes=len(packed.data),
            lqer_bytes=artifact_report(qm, packed, {})["bytes_per_class"].get("lqer", 0),
            corrected=len(fixes),
            error_kept=kept or None,
            bpb=round(after, 5),
            gap=round(after - before, 5),
        )


if __name__ == "__main__":
    main()
