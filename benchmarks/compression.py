"""Bytes per parameter of each codec vs the order-0 entropy bound; the record-sized packing check.

    python benchmarks/compression.py                 # record-sized model (11 × 512, MLP 3×, V 1024)
    python benchmarks/compression.py --run RUN       # a trained run's weights instead

Prints JSON lines:
- `stage`: seconds of Hessian capture, GPTQ, packing (CPU);
- `codec`: for the int6 weight sections, bytes per parameter of every codec and of the entropy
  bound, and the chosen (per-section smallest) packing's distance to the bound;
- `record`: model bytes + code bytes vs the 16,000,000-byte cap.
The record-sized model has random weights (normal, row std 0.02, no training) and a Hessian from
random tokens: SDClip makes the integers' entropy depend on k, not on the weights' scale, so the
bytes are representative; the error numbers are not (see gptq_error.py for trained weights).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from pgolf import rundir
from pgolf.artifact.container import unpack_artifact
from pgolf.artifact.load import dequantize_artifact
from pgolf.config import load_preset
from pgolf.model.gpt import GPT, count_parameters
from pgolf.quant.config import QuantConfig
from pgolf.quant.fit import artifact_report, fit_to_budget
from pgolf.quant.hessian import collect_hessians
from pgolf.quant.pipeline import hessian_names
from pgolf.quant.quantize import quantize_model
from pgolf.rules import BYTES_CAP


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def record_model(seed: int = 0) -> GPT:
    cfg = load_preset("baseline").model
    cfg.num_layers, cfg.model_dim, cfg.mlp_mult, cfg.vocab_size = 11, 512, 3.0, 1024
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path)
    ap.add_argument("--code-bytes", type=int, default=100_000)
    ap.add_argument("--calib-seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ex = QuantConfig(codec="mixed")  # int6 GPTQ + SDClip 12.85, int8 embedding, auto codecs
    if args.run:
        from safetensors.torch import load_file

        cfg = rundir.load_config(args.run)
        model = GPT(cfg.model)
        model.load_state_dict(load_file(args.run / rundir.WEIGHTS))
        ex.keep_float_max_numel = 0  # demo matrices are small; quantise them all
    else:
        model = record_model()
    model.eval()
    emit(
        bench="model",
        params=count_parameters(model),
        layers=model.cfg.num_layers,
        dim=model.cfg.model_dim,
    )

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (args.calib_seqs, args.seq_len), generator=g)
    hessians = collect_hessians(model, list(ids.split(4)), hessian_names(model, ex))
    emit(
        bench="stage",
        stage="hessians",
        seconds=round(time.perf_counter() - t0, 2),
        matrices=len(hessians),
        tokens=int(ids.numel()),
    )

    t0 = time.perf_counter()
    qm = quantize_model(model, ex, hessians)
    emit(
        bench="stage",
        stage="gptq_int6",
        seconds=round(time.perf_counter() - t0, 2),
        fallbacks=sum(1 for s in qm.stats.values() if s.get("fallback")),
    )

    t0 = time.perf_counter()
    target = BYTES_CAP - args.code_bytes
    packed, fit = fit_to_budget(qm, target, "auto", "pm1", hessians)
    report = artifact_report(qm, packed, fit)
    emit(bench="stage", stage="pack_auto", seconds=round(time.perf_counter() - t0, 2))
    t0 = time.perf_counter()
    dequantize_artifact(*unpack_artifact(packed.data))
    emit(bench="stage", stage="load_verify_dequantize", seconds=round(time.perf_counter() - t0, 2))

    for bits in sorted({e["bits"] for e in qm.meta["tensors"].values() if e["scheme"] == "int"}):
        names = {n for n, e in qm.meta["tensors"].items() if e.get("bits") == bits}
        secs = [s for s in packed.sections if set(s["names"]) <= names and s["dtype"] == "int8"]
        params = sum(s["raw_nbytes"] for s in secs)
        bound = sum(s["entropy_bytes"] for s in secs)
        chosen = sum(s["nbytes"] for s in secs)
        row = {
            c: round(sum(s["candidates"][c] for s in secs) / params, 5)
            for c in secs[0]["candidates"]
        }
        emit(
            bench="codec",
            bits=bits,
            params=params,
            bytes_per_param=row,
            entropy_bound_per_param=round(bound / params, 5),
            chosen_per_param=round(chosen / params, 5),
            chosen_over_bound=round(chosen / bound - 1, 5),
            chosen_codecs=sorted({s["codec"] for s in secs}),
        )
    emit(
        bench="record",
        bytes_model=report["bytes_model"],
        bytes_code=args.code_bytes,
        bytes_total=report["bytes_model"] + args.code_bytes,
        cap=BYTES_CAP,
        fits=report["bytes_model"] + args.code_bytes <= BYTES_CAP,
        bytes_per_class=report["bytes_per_class"],
        pruned=report["pruned"],
    )


if __name__ == "__main__":
    main()
