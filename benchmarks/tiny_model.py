"""The trained model the quant benchmarks (gptq_error, scale_floor, lqer_gap) measure.

Without --run, a demo-sized model (4×128) is trained here for --train-seconds with AdamW on the
shared dev shard; its last HELD_OUT tokens, which training never sees, are the evaluation tokens.
With --run, the weights, data and sequence length of a `pgolf run` directory are used instead.
GPTQ calibration reads the first training tokens (`ModelUnderTest.hessians`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pgolf.artifact.container import unpack_artifact
from pgolf.artifact.load import dequantize_artifact
from pgolf.config import config_from_dict, load_preset
from pgolf.data.shards import load_tokens, read_shard
from pgolf.data.tokenizer import build_byte_tables, load_tokenizer
from pgolf.dist import current_world
from pgolf.eval.bpb import TorchByteTables
from pgolf.eval.score import score_nonoverlapping
from pgolf.model.gpt import GPT
from pgolf.quant.hessian import collect_hessians
from pgolf.settings import shared_data

DEV_SHARD = shared_data("corpus", "fineweb_pg_sp1024_dev_shard", "fineweb_train_000000.bin")
TOKENIZER = shared_data("tokenizers", "fineweb_1024_bpe.model")
HELD_OUT = 60_000


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


def add_model_arguments(ap: argparse.ArgumentParser, train_seconds: float, threads: int) -> None:
    """The options every quant benchmark takes: where the model comes from, threads, eval size."""
    ap.add_argument("--run", type=Path, help="run directory with config.json + model.safetensors")
    ap.add_argument("--train-seconds", type=float, default=train_seconds)
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--eval-tokens", type=int, default=131072, help="0 = all")


@dataclass
class ModelUnderTest:
    """A trained model in eval mode, its training and evaluation tokens and byte tables."""

    model: GPT
    train_tokens: np.ndarray
    eval_tokens: np.ndarray
    tables: TorchByteTables
    seq: int

    def bpb(self, model: GPT | None = None) -> float:
        """BPB of `model` (default: the trained one) over the evaluation tokens."""
        model = self.model if model is None else model
        return score_nonoverlapping(
            model, self.eval_tokens, self.seq, 65536, self.tables, current_world()
        ).bpb

    def hessians(self, seqs: int, start: int = 0) -> dict[str, torch.Tensor]:
        """GPTQ Hessians of the model over `seqs` training sequences from token `start` on."""
        return collect_hessians(self.model, batches(self.train_tokens, seqs, self.seq, start))

    def round_trip_bpb(self, artifact: bytes) -> float:
        """BPB of the model an artifact decodes to."""
        restored = GPT(self.model.cfg)
        restored.load_state_dict(dequantize_artifact(*unpack_artifact(artifact)))
        return self.bpb(restored)


def model_under_test(args: argparse.Namespace) -> ModelUnderTest:
    """The model of --run, or one trained here; sets torch's threads to --threads first."""
    torch.set_num_threads(args.threads)
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
    return ModelUnderTest(model, train_tokens, eval_tokens, tables, seq)
