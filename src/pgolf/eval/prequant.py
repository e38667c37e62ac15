"""Pre-quant TTT on validation data (P1351 "Discriminative TTT", SPEC §5.30, §9.5): ILLEGAL.

It fine-tunes the float model on every validation token for several epochs *before* quantising
and scoring, i.e. it trains on tokens before they are scored, which the README rule and
condition 3 of SPEC §1.4 forbid (PR #1376 closed, issue #677, PR #1972 audit). It exists only to
reproduce that seed for research: it refuses to run unless called with `allow_illegal=True`, and
returns a compliance record saying `score_first: False` and why. It deliberately bypasses the
scored-target ledger, through the one door `pgolf.eval.ttt` has for that,
`train_step_on_unscored_tokens_illegal`; nothing in the legal evaluation path calls either.

What it does (P1351): AdamW, all validation tokens cut into T-token sequences split over ranks,
`batch_seqs` per rank per step, gradients averaged, clipped, per-epoch cosine from lr to
`min_lr_frac`·lr, blocks frozen below `freeze_blocks`, block i's LR scaled linearly from
`block_lr_start` to 1.0. P1351's banked model applied those multipliers to block scalars only;
on pgolf's unbanked GPT they reach every block weight (set block_lr_start=1.0 to match its
effective flat LR).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from pgolf.dist import World
from pgolf.eval.config import EvalConfig, validate_eval_config
from pgolf.eval.ttt import (
    build_optimizer,
    cut_sequences,
    num_blocks,
    only_these_trainable,
    refuse_unless_illegal_allowed,
    select_ttt_params,
    step_plan,
    train_step_on_unscored_tokens_illegal,
)
from pgolf.progress import progress_bar

ILLEGAL_REASON = (
    "pre-quant TTT trains on every validation token before that token is scored (SPEC §1.4 "
    "condition 3, §5.30; PR #1376 closed, issue #677, PR #1972 audit)"
)


def prequant_ttt(
    model: torch.nn.Module,
    tokens: np.ndarray,
    cfg: EvalConfig,
    world: World,
    *,
    seq_len: int,
    allow_illegal: bool = False,
    progress: bool = False,
) -> dict:
    """Fine-tune `model` (the float model, before quantisation) on `tokens`; returns the record.

    Raises `IllegalEvaluationError` unless `allow_illegal`. The model is modified in place: that is
    the point of the technique.
    """
    refuse_unless_illegal_allowed(allow_illegal, ILLEGAL_REASON)
    validate_eval_config(cfg)
    t0 = time.perf_counter()
    tokens = np.asarray(tokens, dtype=np.int64)
    num_targets = max(len(tokens) - 1, 0)
    # Whole sequences only, as P1351 (30,284 of 2,048 from the sp1024 val stream).
    pieces = cut_sequences(num_targets // seq_len * seq_len, seq_len)
    named = select_ttt_params(model, freeze_blocks=cfg.prequant_ttt_freeze_blocks)
    lr, min_lr = cfg.prequant_ttt_lr, cfg.prequant_ttt_lr * cfg.prequant_ttt_min_lr_frac
    plan = step_plan([n for _, n in pieces], world, cfg.prequant_ttt_batch_seqs)
    steps = 0
    bar = progress_bar(
        total=cfg.prequant_ttt_epochs * len(plan),
        desc="pre-quant TTT (illegal)",
        enabled=progress and world.is_main,
    )
    was_training = model.training
    with only_these_trainable(model, named):
        optimizer = build_optimizer(
            named,
            kind="adamw",
            lr=lr,
            momentum=0.0,
            betas=(0.9, 0.999),
            weight_decay=0.0,
            block_lr_start=cfg.prequant_ttt_block_lr_start,
            blocks=num_blocks(model),
        )
        try:
            for epoch in range(cfg.prequant_ttt_epochs):
                # torch's CosineAnnealingLR stepped per epoch, one eta_min for every group.
                cos = 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.prequant_ttt_epochs))
                for group in optimizer.param_groups:
                    group["lr"] = min_lr + (lr * group["lr_mult"] - min_lr) * cos
                for mine, global_targets in plan:
                    train_step_on_unscored_tokens_illegal(
                        model,
                        named,
                        optimizer,
                        tokens,
                        [pieces[i] for i in mine],
                        global_targets,
                        world,
                        grad_clip=cfg.prequant_ttt_grad_clip,
                        allow_illegal=allow_illegal,
                    )
                    steps += 1
                    bar.update(1)
        finally:
            bar.close()
            model.train(was_training)
    return {
        "score_first": False,
        "reason": ILLEGAL_REASON,
        "epochs": cfg.prequant_ttt_epochs,
        "lr": lr,
        "min_lr": min_lr,
        "block_lr_start": cfg.prequant_ttt_block_lr_start,
        "freeze_blocks": cfg.prequant_ttt_freeze_blocks,
        "sequences": len(pieces),
        "steps": steps,
        "trainable_params": sum(p.numel() for _, p in named),
        "time_s": time.perf_counter() - t0,
    }
