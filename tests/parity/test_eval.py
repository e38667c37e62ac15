"""Evaluation parity (SPEC §3): pgolf's evaluator against each official eval loop.

Both sides score the same official sp1024 tokens with the same weights (the official GPT and
pgolf's GPT holding its state dict give bit-identical logits), and the three float64 sums
(nats, bytes, predictions) each official loop all-reduces are read off directly.

The one intentional difference (SPEC §3.6): every script before S1413 rescores the last `stride`
targets once per truncated tail window; pgolf implements S1413's exact tiling, where every target
is scored once. Both directions are pinned: pgolf's scorer run over the older windows gives the
older totals, and those windows recounted without the repeats are exactly pgolf's tiling, so the
official totals minus pgolf's are exactly the rescored tail (its predictions, bytes and nats).
"""

from __future__ import annotations

import ast
import contextlib
import types

import numpy as np
import pytest
import torch

from pgolf.config import load_preset
from pgolf.data.shards import write_shard
from pgolf.data.tokenizer import build_byte_tables, load_tokenizer
from pgolf.dist import World
from pgolf.eval.bpb import TorchByteTables
from pgolf.eval.evaluate import evaluate
from pgolf.eval.score import score_nonoverlapping
from pgolf.eval.scorer import WindowScorer, sums_from_tensor
from pgolf.eval.windows import Tiling, sliding_tiling
from pgolf.model.gpt import GPT
from tests.conftest import OFFICIAL_TOKENIZER
from tests.test_eval_scorer import byte_tables, stream_tokens

from .models import PRESET_SCRIPT, official_gpt, official_state_dict, pair
from .official import assert_close, load_definitions, load_official, no_compile, reference_path

CPU = torch.device("cpu")
CPU_WORLD = World(rank=0, world_size=1, local_rank=0, device=CPU)
T, STRIDE = 64, 16  # window and stride, shrunk from 2048 / 64 (context 48)
# 541 targets: the last window is truncated and 13 targets is not a multiple of the stride.
N_TARGETS = 8 * T + 29
OLDER_SLIDING = ("s414", "s549", "s1019", "s1060", "p639", "p578", "p1004", "p1351")
SCRIPT_PRESET = {script: preset for preset, script in PRESET_SCRIPT.items() if preset != "demo"}
NATS_RTOL = 1e-9
FLOAT32_MEAN_RTOL = 1e-6


# What S1413's sliding and TTT evals call: the rest of its file is never run.
S1413_EVAL_DEFINITIONS = (
    "Hyperparameters",
    "build_sentencepiece_luts",
    "_loss_bpb",
    "eval_val_sliding",
    "eval_val_sliding_ttt",
)


# -- reading the official sums ------------------------------------------------------------------
class SumTap:
    """Stands in for `torch.distributed` inside an official loop: every loop ends by all-reducing
    its (nats, predictions, bytes) accumulators, in that order, so recording them gives the sums."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self):
        self.reduced: list[float] = []

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def all_reduce(self, t, op=None):
        self.reduced.append(float(t))

    @property
    def sums(self) -> tuple[float, float, float]:
        nats, predictions, num_bytes = self.reduced[:3]
        return nats, num_bytes, predictions


@contextlib.contextmanager
def tapped(namespace):
    """Tap the sums of the official calls inside: `tap.sums` = (nats, bytes, predictions)."""
    tap = SumTap()
    saved = namespace.dist
    namespace.dist = tap
    try:
        with no_compile():
            yield tap
    finally:
        namespace.dist = saved


def s1413_namespace(**env) -> types.ModuleType:
    """S1413's eval functions and Hyperparameters, executed alone from its decoded source."""
    module = load_definitions("s1413", S1413_EVAL_DEFINITIONS, **env)
    module.args.rank, module.args.world_size = 0, 1
    return module


# -- the shared model, tokens and tables ----------------------------------------------------------
def perturbed_official_gpt(mod, seed: int = 0):
    """The script's GPT as its main() builds it, every weight nudged so that none is zero."""
    torch.manual_seed(seed)
    model = official_gpt(mod).float()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def models():
    """The official pr414 GPT and pgolf's twin holding its weights."""
    mod, cfg = pair("pr414")
    theirs = perturbed_official_gpt(mod)
    ours = GPT(cfg)
    ours.load_state_dict(official_state_dict(mod, theirs))
    return theirs.eval(), ours.eval()


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return stream_tokens(N_TARGETS + 1)


@pytest.fixture(scope="module")
def tables() -> TorchByteTables:
    return byte_tables()


def official_luts(mod, vocab: int = 1024):
    return mod.build_sentencepiece_luts(load_tokenizer(OFFICIAL_TOKENIZER), vocab, CPU)


def as_sums(result: dict) -> tuple[float, float, float]:
    return result["val_nats"], result["val_bytes"], result["val_tokens"]


def assert_sums(what: str, ours, theirs, nats_rtol: float = NATS_RTOL) -> None:
    """Predictions and bytes exactly; nats to float64 rounding (the logits are bit-identical)."""
    assert_close(f"{what}: predictions", ours[2], theirs[2])
    assert_close(f"{what}: bytes", ours[1], theirs[1])
    assert_close(f"{what}: nats", ours[0], theirs[0], rtol=nats_rtol)


def eval_config(script: str, **overrides):
    """The preset's [eval] section, shrunk to the test's window and stride, TTT off."""
    cfg = load_preset(SCRIPT_PRESET[script]).eval
    cfg.eval_seq_len, cfg.eval_stride, cfg.eval_time_cap_s, cfg.ttt_enabled = T, STRIDE, 0, False
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def pgolf_eval(model, tokens, tables, cfg) -> tuple[float, float, float]:
    return as_sums(evaluate(model, tokens, tables, cfg, CPU_WORLD, train_seq_len=T))


def score_tiling(model, tokens, tables, tiling: Tiling, batch: int = 32):
    """pgolf's window scorer over any tiling (no ledger: a tiling may rescore)."""
    scorer = WindowScorer(model, tokens, tiling, tables, CPU_WORLD, batch)
    acc, _ = scorer.score_range(0, len(tiling))
    s = sums_from_tensor(acc)
    return s.nats, s.bytes, s.tokens


# -- the older windows, as SPEC §3.6 describes them ---------------------------------------------
def older_tiling(num_targets: int, seq_len: int, stride: int, ttt: bool = False) -> Tiling:
    """Windows at every multiple of the stride below n, each scoring its last `stride` targets
    (the first window all of them); the TTT loops drop windows shorter than the stride."""
    starts = np.arange(0, num_targets, stride, dtype=np.int64)
    lengths = np.minimum(starts + seq_len, num_targets) - starts
    if ttt:
        keep = (lengths >= stride) | (starts == 0)
        starts, lengths = starts[keep], lengths[keep]
    score_from = np.where(starts == 0, 0, np.maximum(lengths - stride, 0))
    return Tiling(seq_len, stride, num_targets, starts, lengths, score_from)


def without_rescoring(tiling: Tiling) -> Tiling:
    """The same windows in order, each scoring only targets no earlier window scored."""
    done = np.maximum.accumulate(np.concatenate(([0], tiling.scored_hi[:-1])))
    lo = np.maximum(tiling.scored_lo, done)
    keep = lo < tiling.scored_hi
    starts, lengths = tiling.starts[keep], tiling.lengths[keep]
    score_from = lo[keep] - starts
    return Tiling(tiling.seq_len, tiling.stride, tiling.num_targets, starts, lengths, score_from)


def rescored_targets(tiling: Tiling) -> np.ndarray:
    """Target indices scored more than once, each listed once per extra time."""
    pairs = zip(tiling.scored_lo, tiling.scored_hi, strict=True)
    hits = np.concatenate([np.arange(a, b) for a, b in pairs])
    counts = np.bincount(hits, minlength=tiling.num_targets)
    return np.repeat(np.arange(tiling.num_targets), np.maximum(counts - 1, 0))


# -- byte tables and the non-overlapping baseline eval --------------------------------------------
@pytest.mark.parametrize(
    ("script", "table_size"), [("base", 1024), ("base", 1100), ("s1413", 1024)]
)
def test_byte_tables_equal_the_official_sentencepiece_luts(script, table_size):
    """SPEC §3.1, also when the model's vocabulary pads the table past the tokenizer's."""
    mod = s1413_namespace() if script == "s1413" else load_official(script)
    theirs = official_luts(mod, table_size)
    ours = build_byte_tables(load_tokenizer(OFFICIAL_TOKENIZER), table_size)
    names = ("base_bytes", "has_leading_space", "is_boundary")
    for name, official in zip(names, theirs, strict=True):
        assert_close(f"byte table {name}", torch.from_numpy(getattr(ours, name)), official)


@pytest.mark.parametrize("entry", ["evaluate", "score_nonoverlapping"])
def test_nonoverlapping_sums_equal_the_baseline_eval_val(entry, tokens, tables, tmp_path):
    """SPEC §3.5: the baseline trims the stream to whole windows and scores each from zero context;
    pgolf's `evaluate` and its training-time `score_nonoverlapping` give the same three sums.

    The baseline adds up float32 batch means (`model(x, y)` · count), so its nats carry float32
    rounding (≈ 1e-7 relative here); pgolf sums every prediction's loss in float64."""
    mod, cfg = pair("baseline")
    theirs = perturbed_official_gpt(mod).eval()
    ours = GPT(cfg).eval()
    ours.load_state_dict(official_state_dict(mod, theirs))
    write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    val = mod.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), T)
    batch_tokens = 4 * T  # four windows per forward: several batches and a short last one
    mod.args.train_seq_len, mod.args.val_batch_size = T, batch_tokens
    with tapped(mod) as tap:
        mod.eval_val(mod.args, theirs, 0, 1, CPU, 1, val, *official_luts(mod))
    if entry == "evaluate":
        cfg = eval_config("base", val_batch_tokens=batch_tokens)
        assert cfg.eval_mode == "nonoverlapping"
        ours_sums = pgolf_eval(ours, tokens, tables, cfg)
    else:
        s = score_nonoverlapping(ours, tokens, T, batch_tokens, tables, CPU_WORLD)
        ours_sums = (s.nats, s.bytes, s.tokens)
    assert tap.sums[2] == (N_TARGETS // T) * T  # the trimmed tail is really not scored
    assert_sums("baseline eval_val", ours_sums, tap.sums, nats_rtol=FLOAT32_MEAN_RTOL)


# -- sliding windows ----------------------------------------------------------------------------
def test_s1413_sliding_sums_equal_pgolf(models, tokens, tables):
    """SPEC §3.6: S1413's exact tiling is pgolf's; the sums agree with nothing left over."""
    theirs, ours = models
    ns = s1413_namespace(EVAL_SEQ_LEN=T, EVAL_STRIDE=STRIDE, VOCAB_SIZE=1024)
    val = types.SimpleNamespace(val_tokens=torch.from_numpy(tokens.astype(np.int64)))
    val.base_bytes_lut, val.has_leading_space_lut, val.is_boundary_token_lut = official_luts(ns)
    with tapped(ns) as tap:
        ns.eval_val_sliding(ns.args, CPU, val, theirs)
    assert tap.sums[2] == N_TARGETS  # each target exactly once
    assert_sums(
        "S1413 eval_val_sliding", pgolf_eval(ours, tokens, tables, eval_config("s1413")), tap.sums
    )


def function_ast(script: str, name: str) -> str:
    """A function of an official script as an AST dump, without its docstring or formatting."""
    tree = ast.parse(reference_path(script).read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) else fn.body
    return ast.dump(ast.Module(body=body, type_ignores=[]))


def test_the_older_sliding_eval_is_one_function_in_eight_scripts():
    """Only two sliding evals exist: S1413's and this one, so S414 stands for all eight below."""
    first, *rest = OLDER_SLIDING
    reference = function_ast(first, "eval_val_sliding")
    for script in rest:
        same = function_ast(script, "eval_val_sliding") == reference
        assert same, f"{script}'s eval_val_sliding differs from {first}'s: give it its own case"


def test_older_sliding_sums_are_pgolf_plus_the_rescored_tail(models, tokens, tables):
    """SPEC §3.6, the older `eval_val_sliding`: pgolf's scorer over the older windows reproduces
    the official totals, and the official totals exceed pgolf's exact tiling by exactly the
    rescored tail targets: their count, their bytes and their nats."""
    theirs, ours = models
    mod = load_official("s414", TRAIN_SEQ_LEN=T)
    with tapped(mod) as tap:
        mod.eval_val_sliding(
            mod.args,
            theirs,
            0,
            1,
            CPU,
            torch.from_numpy(tokens.astype(np.int64)),
            *official_luts(mod),
            stride=STRIDE,
            eval_seq_len=T,
        )
    older = older_tiling(N_TARGETS, T, STRIDE)
    older_sums = score_tiling(ours, tokens, tables, older)
    assert_sums("S414 eval_val_sliding vs pgolf over its windows", older_sums, tap.sums)

    exact = pgolf_eval(ours, tokens, tables, eval_config("s414"))
    extra = rescored_targets(older)
    stream = torch.from_numpy(tokens.astype(np.int64))
    extra_bytes = tables.target_bytes(stream[extra], stream[extra + 1])
    assert extra.size > 0 and extra.min() >= N_TARGETS - STRIDE  # only the last stride repeats
    assert_close("official − pgolf predictions", tap.sums[2] - exact[2], extra.size)
    assert_close("official − pgolf bytes", tap.sums[1] - exact[1], int(extra_bytes.sum()))
    assert_close(
        "official − pgolf nats = the repeats' nats",
        tap.sums[0] - exact[0],
        older_sums[0] - exact[0],
        atol=NATS_RTOL * abs(tap.sums[0]),
    )


@pytest.mark.parametrize(
    ("num_targets", "seq_len", "stride"),
    [(N_TARGETS, T, STRIDE), (8 * T, T, STRIDE), (40, T, STRIDE), (1000, 2048, 64), (333, 7, 3)],
)
@pytest.mark.parametrize("ttt", [False, True])
def test_exact_tiling_is_the_older_windows_without_rescoring(num_targets, seq_len, stride, ttt):
    """pgolf's tiling = the older windows (plain or TTT variant), each target counted the first
    time it is scored: same windows, same context for every target, nothing dropped."""
    dedup = without_rescoring(older_tiling(num_targets, seq_len, stride, ttt))
    exact = sliding_tiling(num_targets, seq_len, stride)
    for name in ("starts", "lengths", "score_from"):
        assert np.array_equal(getattr(dedup, name), getattr(exact, name)), name
    assert exact.num_scored == num_targets


def test_this_stream_has_a_rescored_tail():
    """The shrunk stream exercises the difference: 48 of the older eval's 589 predictions repeat."""
    older = older_tiling(N_TARGETS, T, STRIDE)
    assert (older.num_scored, rescored_targets(older).size) == (589, 48)
