"""C2 of SPEC §1.4, measured: the scored distribution is a full softmax over the vocabulary.

The run checks it on the model it evaluated (report.json `compliance.normalisation`) and
`pgolf audit` runs it again; both decide through `pgolf.rules.normalisation`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pgolf.dist import World
from pgolf.eval.bpb import TorchByteTables
from pgolf.eval.scorer import WindowScorer
from pgolf.eval.windows import build_tiling

MASS_TOL = 1e-4


def scored_nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-position NLL exactly as pgolf.eval's scorer computes it (full softmax at T)."""
    if temperature != 1.0:
        logits = logits / temperature
    return F.cross_entropy(logits.float(), targets, reduction="none")


@torch.no_grad()
def eval_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fp32 logits of `model` in eval mode, its training flag restored after."""
    was_training = model.training
    model.eval()
    try:
        return model(x).float()
    finally:
        model.train(was_training)


def normalisation_probe(
    model: torch.nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    temperature: float,
    vocab: int,
    byte_tables: TorchByteTables,
    world: World,
    positions: int = 4,
) -> dict:
    """The scored probabilities of all V candidate targets sum to 1 at sampled positions.

    The candidates go through `scored_nll`, the scorer's rule; a second check ties that rule to
    the real scorer: pgolf.eval's WindowScorer must report the same nats on the probe window.
    `world` must be a single process: the scorer splits its one window over the ranks.
    """
    length = min(seq_len, len(tokens) - 1)
    window = np.asarray(tokens[: length + 1], dtype=np.int64)
    x = torch.as_tensor(window[:-1], device=world.device)[None]
    y = torch.as_tensor(window[1:], device=world.device)
    logits = eval_logits(model, x)[0]
    candidates = torch.arange(logits.size(-1), device=world.device)
    worst = 0.0
    for pos in np.linspace(0, length - 1, num=min(positions, length)).astype(int).tolist():
        rows = logits[pos].expand(len(candidates), -1)
        mass = float(torch.exp(-scored_nll(rows, candidates, temperature).double()).sum())
        worst = max(worst, abs(mass - 1.0)) if np.isfinite(mass) else float("inf")
    probe_nats = float(scored_nll(logits, y, temperature).double().sum())
    tiling = build_tiling(window, length, "nonoverlapping", length, False)
    scorer = WindowScorer(model, window, tiling, byte_tables, world, 1, temperature)
    acc, _ = scorer.score_range(0, len(tiling))
    scorer_nats = float(acc[0])
    # bf16 autocast on CUDA makes the scorer's logits differ slightly from the fp32 probe
    rel_tol = 1e-2 if world.is_cuda else 1e-5
    same = abs(scorer_nats - probe_nats) <= rel_tol * max(abs(probe_nats), 1.0)
    vocab_ok = logits.size(-1) >= vocab
    ok = worst <= MASS_TOL and same and vocab_ok
    detail = (
        f"probability mass over {logits.size(-1)} candidates (tokenizer vocab {vocab}) is 1 "
        f"within {worst:.1e} at temperature {temperature:g}; scorer nats {scorer_nats:.6f} vs "
        f"softmax rule {probe_nats:.6f} on a {length}-token window"
    )
    return {"ok": ok, "detail": detail, "max_mass_error": worst}
