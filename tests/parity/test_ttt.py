"""Score-first TTT parity (SPEC §5.29, §9.1–9.4): each seed's official loop against pgolf's.

Each case runs the official TTT function on the official GPT and pgolf's `score_first_ttt`,
configured by the preset's [eval] section, on pgolf's GPT holding the same weights, over the same
four chunks of official sp1024 tokens (window 64, stride 16, chunk 128 = 2 sequences, one sequence
per step where the recipe uses mini-batches). Compared: which tensors adapt (the freezing rules),
the weights after the trained chunks (optimizer, LR schedule across and within chunks, epochs,
clipping, momentum/EMA state), and the first-pass sums s_0.

Shrinking: SGD learning rates are raised 50× so that an update moves weights by ~1e-3, far above
the 1e-6 tolerance (with the record's lr a wrong step could hide below it); AdamW steps are ~lr
per weight already. P639's "freeze 9 of 11" keeps its meaning, the last two blocks adapt: freeze
2 of 4. The official loop counts frozen blocks from the front, `range(min(k, L))`, as pgolf
does, so an unshrunk 9 on 4 layers would freeze every block (pinned by its own case).

Intentional difference: the loops before S1413 rescore the last `stride` targets once per
truncated tail window in the last chunk (SPEC §3.6); pgolf scores each target once. Those loops'
totals are therefore compared with pgolf's s_0 plus those repeats, scored with the weights that
score the last chunk.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from pgolf.config import load_preset
from pgolf.eval import ttt as ttt_module
from pgolf.eval.budget import EvalClock
from pgolf.eval.ttt import score_first_ttt
from pgolf.eval.windows import Tiling, build_tiling
from pgolf.model.gpt import GPT
from tests.test_eval_scorer import byte_tables, stream_tokens

from .models import PRESET_SCRIPT, official_state_dict, script_env, shrunk_config
from .official import assert_close, load_official
from .test_eval import (
    CPU,
    CPU_WORLD,
    STRIDE,
    T,
    official_luts,
    older_tiling,
    perturbed_official_gpt,
    s1413_namespace,
    score_tiling,
    tapped,
)

CHUNK = 2 * T
N_TARGETS = 3 * CHUNK + 77  # four chunks, the last one partial
SGD_LR_BOOST = 50.0
WEIGHT_ATOL = 1e-6
S0_NATS_RTOL = 1e-6


@dataclass(frozen=True)
class Recipe:
    preset: str
    env: dict  # the official script's environment (shrunk)
    pgolf: dict = field(default_factory=dict)  # the same shrink applied to the preset's [eval]
    tail: bool = True  # the official loop rescores the tail (every loop before S1413)
    scoring_batch: int = 32  # windows per official scoring forward


def _sgd(lr: float) -> str:
    return str(lr * SGD_LR_BOOST)


P639_ADAMW = dict(TTT_LR=1e-4, TTT_ADAMW=1, TTT_WD=0, TTT_TRAIN_BATCH_SEQS=1)
P610_LOOP = dict(TTT_EVAL_STRIDE=STRIDE, TTT_OPTIMIZER="sgd", TTT_LR_SCHEDULE="cosine")
RECIPES = {
    "S549 SGD": Recipe(
        "pr549",
        dict(TTT_LR=_sgd(0.002), TTT_FREEZE_BLOCKS=0, TTT_BATCH_SEQS=1),
        dict(ttt_lr=0.002 * SGD_LR_BOOST),
    ),
    "S1413 SGD": Recipe(
        "pr1413",
        dict(TTT_LR=_sgd(0.005), TTT_FREEZE_BLOCKS=0, TTT_BATCH_SEQS=1),
        dict(ttt_lr=0.005 * SGD_LR_BOOST),
        tail=False,
    ),
    "P639 AdamW": Recipe("seed-p639", P639_ADAMW | dict(TTT_FREEZE_BLOCKS=2)),
    "P639 AdamW + Born SNR²": Recipe(
        "seed-p639",
        P639_ADAMW | dict(TTT_FREEZE_BLOCKS=2, EB_TTT=1, EB_TTT_BORN=1),
        dict(ttt_snr_scaling=True),
    ),
    "P639 freeze 9 of 4": Recipe(
        "seed-p639", P639_ADAMW | dict(TTT_FREEZE_BLOCKS=9), dict(ttt_freeze_blocks=9)
    ),
    "P610 SGD, 3 of 4 chunks": Recipe(
        "seed-p610",
        P610_LOOP | dict(TTT_LR=_sgd(0.002), TTT_FREEZE_BLOCKS=2, TTT_MAX_CHUNKS=3),
        dict(ttt_lr=0.002 * SGD_LR_BOOST, ttt_max_chunks=3),
        tail=False,  # the last processed chunk is not the stream's last: no tail is scored
    ),
    "P578 SGD + TTT-EMA": Recipe(
        "seed-p578",
        dict(TTT_LR=_sgd(0.002), TTT_FREEZE_BLOCKS=2, TTT_BATCH_SEQS=1, TTT_MAX_TRAIN_CHUNKS=2),
        dict(ttt_lr=0.002 * SGD_LR_BOOST, ttt_train_chunks=2),
    ),
    "P1004 AdamW, last 2 blocks": Recipe("seed-p1004", {}, scoring_batch=1),
}


def pgolf_config(recipe: Recipe):
    cfg = load_preset(recipe.preset).eval
    assert cfg.ttt_enabled and cfg.eval_mode == "sliding"
    cfg.eval_seq_len, cfg.eval_stride, cfg.ttt_chunk_tokens = T, STRIDE, CHUNK
    cfg.eval_time_cap_s, cfg.eval_batch_windows = 0, recipe.scoring_batch
    cfg.ttt_batch_seqs = 1 if cfg.ttt_batch_seqs > 0 else 0
    if cfg.ttt_freeze_blocks > 2:  # P639: 9 of 11 = all but the last two; on 4 layers, 2
        cfg.ttt_freeze_blocks = 2
    for k, v in recipe.pgolf.items():
        setattr(cfg, k, v)
    return cfg


def official_module(recipe: Recipe):
    """The script behind the preset, its model shrunk as pgolf's and its TTT env set."""
    # S1413's script needs Python 3.12 to import; its loop is model-agnostic (freeze 0), so it
    # adapts the S414-family GPT here.
    preset = "pr414" if recipe.preset == "pr1413" else recipe.preset
    cfg = shrunk_config(preset)
    script = PRESET_SCRIPT[preset]
    env = dict(TRAIN_SEQ_LEN=T, EVAL_SEQ_LEN=T, TTT_CHUNK_TOKENS=CHUNK, TTT_EPOCHS=3)
    env |= script_env(cfg, script) | {k: str(v) for k, v in recipe.env.items()}
    return load_official(script, **env), cfg, env


def run_official(recipe: Recipe, mod, env: dict, model, tokens: np.ndarray):
    """The official TTT loop on `model`; returns the sums it all-reduces."""
    val = torch.from_numpy(tokens.astype(np.int64))
    luts = official_luts(mod)
    # RoPE tables cached while scoring under inference_mode would be inference tensors that the
    # next training step cannot save; on CUDA the bf16 autocast hands out copies, on the CPU
    # (fp32, autocast off) they must be built outside inference mode first.
    with torch.no_grad():
        model.forward_logits(val[None, :T])
    if recipe.preset == "pr1413":
        ns = s1413_namespace(**env)
        data = types.SimpleNamespace(val_tokens=val)
        data.base_bytes_lut, data.has_leading_space_lut, data.is_boundary_token_lut = luts
        with tapped(ns) as tap:
            ns.eval_val_sliding_ttt(ns.args, model, 0, 1, CPU, data, stride=STRIDE)
    elif recipe.preset == "seed-p610":
        sys.modules["train_pr414"] = mod  # eval_ttt.py imports its training script by this name
        try:
            ttt = load_official("p610_ttt", **env)
        finally:
            del sys.modules["train_pr414"]
        with tapped(ttt) as tap:
            ttt.eval_ttt_score_first(mod.args, model, 0, 1, CPU, val, *luts)
    elif recipe.preset == "seed-p1004":  # main() passes its TTT settings as arguments
        with tapped(mod) as tap:
            mod.eval_val_sliding_ttt(
                mod.args, model, 0, 1, CPU, val, *luts, stride=STRIDE, ttt_epochs=3,
                ttt_lr=1e-4, ttt_freeze_blocks=2, batch_seqs=1, eval_seq_len=T,
                ttt_chunk_tokens=CHUNK, ttt_optimizer="adamw",
            )  # fmt: skip
    else:
        quiet = {"log0": print} if recipe.preset == "pr549" else {}
        with tapped(mod) as tap:
            mod.eval_val_sliding_ttt(mod.args, model, 0, 1, CPU, val, *luts, stride=STRIDE,
                                     **quiet)  # fmt: skip
    return tap.sums


class RecordingEMA(ttt_module.WeightEMA):
    """pgolf's TTT-EMA, remembered so the test can read the weights it scored with."""

    last: RecordingEMA | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingEMA.last = self


def tail_windows(tiling):
    """The truncated windows at the end of the stream (all scored in the last chunk)."""
    keep = tiling.starts + tiling.seq_len > tiling.num_targets
    arrays = (tiling.starts[keep], tiling.lengths[keep], tiling.score_from[keep])
    return Tiling(tiling.seq_len, tiling.stride, tiling.num_targets, *arrays)


def assert_s0(what: str, ours, theirs) -> None:
    """Predictions and bytes exactly; nats to the drift float rounding gives adapted weights."""
    assert_close(f"{what}: predictions", ours[2], theirs[2])
    assert_close(f"{what}: bytes", ours[1], theirs[1])
    assert_close(f"{what}: nats", ours[0], theirs[0], rtol=S0_NATS_RTOL)


@pytest.mark.parametrize("name", list(RECIPES))
def test_score_first_ttt_matches_the_official_loop(name, monkeypatch):
    recipe = RECIPES[name]
    tokens = stream_tokens(N_TARGETS + 1)
    mod, cfg_model, env = official_module(recipe)
    theirs = perturbed_official_gpt(mod)
    start = {k: v.clone() for k, v in official_state_dict(mod, theirs).items()}
    official_sums = run_official(recipe, mod, env, theirs, tokens)

    ours = GPT(cfg_model)
    ours.load_state_dict(start)
    monkeypatch.setattr(ttt_module, "WeightEMA", RecordingEMA)
    RecordingEMA.last = None
    cfg = pgolf_config(recipe)
    tiling = build_tiling(tokens, T, "sliding", STRIDE, False)
    tables = byte_tables()
    clock = EvalClock(0.0, "warn", CPU_WORLD)
    batch = cfg.eval_batch_windows
    result = score_first_ttt(
        ours, tokens, tiling, tables, cfg, CPU_WORLD, batch_windows=batch, clock=clock,
        restore=False,
    )  # fmt: skip
    if cfg.ttt_ema_decay > 0:  # P578 keeps the EMA weights once training stops
        ema = RecordingEMA.last
        with torch.no_grad():
            for p, s in zip(ema.params, ema.shadow, strict=True):
                p.copy_(s)

    after_theirs, after_ours = official_state_dict(mod, theirs), ours.state_dict()
    moved_theirs = {k for k, v in after_theirs.items() if not torch.equal(v, start[k])}
    moved_ours = {k for k, v in after_ours.items() if not torch.equal(v, start[k])}
    assert moved_ours == moved_theirs, (
        f"adapted tensors differ: only pgolf {sorted(moved_ours - moved_theirs)}, "
        f"only official {sorted(moved_theirs - moved_ours)}"
    )
    biggest = max(float((after_theirs[k] - start[k]).abs().max()) for k in moved_theirs)
    assert biggest > 50 * WEIGHT_ATOL, f"updates too small to test ({biggest:.2g})"
    for k in sorted(moved_theirs):
        assert_close(f"{name}: {k} after TTT", after_ours[k], after_theirs[k], atol=WEIGHT_ATOL)

    ours_sums = (result.sums.nats, result.sums.bytes, result.sums.tokens)
    if recipe.tail:
        older = older_tiling(N_TARGETS, T, STRIDE, ttt=True)
        repeats = [score_tiling(ours, tokens, tables, tail_windows(t)) for t in (older, tiling)]
        ours_sums = tuple(o + a - b for o, a, b in zip(ours_sums, *repeats, strict=True))
    assert_s0(f"{name}: s_0", ours_sums, official_sums)
