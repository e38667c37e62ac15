"""What the records' 1/qmax row-scale floor (quant.scale_floor) does to bytes and BPB.

    python benchmarks/scale_floor.py                     # trains a demo-sized model (~90 s)
    python benchmarks/scale_floor.py --run RUN           # weights of `pgolf run` (demo preset)

Every record up to S1060 and every seed floors a row's scale at 1/qmax (int6 1/31, int8 1/127).
On trained weights, whose rows rarely reach |w| = 1, the floor binds on nearly every row: the
row then uses the grid {k/qmax} instead of its own range, most weights round to 0 or ±1, the
integers compress far better and the model loses precision. This quantizes the same trained model
under several presets' quant settings with the floor on and off and prints, per variant, one
JSON line: artifact bytes (pgolf's container, best codec per section), BPB after the round trip,
the gap to the float model, the share of rows whose scale is ≤ 1/qmax (where the floor binds)
and the mean |q| of the quantised matrices. The demo's
matrices are ≤ 65,536 elements, which the record rule keeps fp16, so every matrix is quantised
here (keep_float_max_numel=0). Model, data and calibration: benchmarks/tiny_model.py.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from tiny_model import add_model_arguments, emit, model_under_test

from pgolf.artifact.container import pack_sections
from pgolf.config import load_preset
from pgolf.quant.grid import qmax_for
from pgolf.quant.quantize import quantize_model

PRESETS = ("pr414", "pr1019", "seed-p578", "seed-p1004")  # GPTQ-lite, S1019 GPTQ, #578 GPTQ, int5


def floored_rows(qm) -> tuple[float, float]:
    """(share of int rows with scale ≤ 1/qmax, i.e. where the floor binds; mean |q|)."""
    at_floor = rows = 0
    abs_sum = numel = 0.0
    for name, entry in qm.meta["tensors"].items():
        if entry["scheme"] != "int":
            continue
        q = np.abs(qm.arrays[name].astype(np.int32))
        s = qm.arrays[name + "::scale"].astype(np.float32)
        floor = np.float16(1.0 / qmax_for(entry["bits"]))
        at_floor += int((s <= floor).sum())
        rows += s.size
        abs_sum += float(q.sum())
        numel += q.size
    return at_floor / max(rows, 1), abs_sum / max(numel, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(ap, train_seconds=90.0, threads=1)
    ap.add_argument("--presets", default=",".join(PRESETS))
    args = ap.parse_args()
    quants = {p: load_preset(p).quant for p in args.presets.split(",")}  # fail before training

    tiny = model_under_test(args)
    calib = tiny.hessians(args.calib_seqs)
    rowmax = [
        float(p.detach().abs().amax(1).median()) for p in tiny.model.parameters() if p.ndim == 2
    ]
    before = tiny.bpb()
    emit(bench="scale_floor", quant="float", bpb=round(before, 5),
         median_row_max=round(float(np.median(rowmax)), 4))  # fmt: skip

    for preset, quant in quants.items():
        for floor in (False, True):
            ex = dataclasses.replace(quant, scale_floor=floor, keep_float_max_numel=0)
            qm = quantize_model(tiny.model, ex, calib)
            data = pack_sections(qm.arrays, qm.meta).data
            after = tiny.round_trip_bpb(data)
            share, mean_q = floored_rows(qm)
            emit(
                bench="scale_floor",
                quant=preset,
                scale_floor=floor,
                bytes=len(data),
                bpb=round(after, 5),
                gap=round(after - before, 5),
                rows_at_floor=round(share, 3),
                mean_abs_q=round(mean_q, 2),
            )


if __name__ == "__main__":
    main()
