"""Score-first test-time training (SPEC §1.4, §5.29, §9.1–9.4, §9.6).

The stream's windows are grouped into chunks of C target positions (a window belongs to the chunk
of its first scored target). For each chunk in order: score all its windows with no gradient, add
them to the reported sums s_0, then train on exactly the targets just scored, for E epochs, unless
it is the last chunk. The chunk trainer and `train_step` take only the `ScoredTokens` that the
`ScoredLedger` releases, so an update on an unscored token cannot happen silently: it raises. The
reported score is s_0; nothing is rescored. P1351's illegal pre-quant TTT trains on tokens no
ledger has scored through its own door, `train_step_on_unscored_tokens_illegal`, which refuses to
run unless the run allows illegal settings.

Seed options (SPEC §9.6): which parameters adapt (frozen first blocks, only the last blocks,
frozen tables by name prefix, embeddings by role, names that always adapt), SGD with persistent
momentum or AdamW, cross-chunk cosine or the P639 double cosine, per-block LR multipliers, the
P639 "Born-rule SNR²" gradient scaling, P578's fixed training window and TTT-EMA used for scoring,
P610's partial-validation `max_chunks`, and full-batch or mini-batch steps.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pgolf.dist import World
from pgolf.errors import PgolfError
from pgolf.eval.bpb import BpbSums, TorchByteTables
from pgolf.eval.budget import EvalClock
from pgolf.eval.config import EvalConfig
from pgolf.eval.ledger import ScoredLedger, ScoredTokens, require_scored
from pgolf.eval.score import autocast_context, rank_window_range
from pgolf.eval.scorer import (
    DocumentSums,
    WindowScorer,
    all_reduce_tensor,
    scoring_model,
    sums_from_tensor,
)
from pgolf.eval.windows import Tiling
from pgolf.model.roles import role_of
from pgolf.progress import progress_bar

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


# -- which parameters adapt ------------------------------------------------------------------
def block_index(name: str) -> int | None:
    match = _BLOCK.match(name)
    return int(match.group(1)) if match else None


def num_blocks(model: nn.Module) -> int:
    found = [block_index(name) for name, _ in model.named_parameters()]
    return 1 + max((i for i in found if i is not None), default=-1)


def _names(csv: str) -> list[str]:
    return [part.strip() for part in csv.split(",") if part.strip()]


def _is_embedding(param: nn.Parameter) -> bool:
    try:
        return role_of(param) == "embedding"
    except ValueError:  # a parameter created without a role cannot be an embedding by role
        return False


def select_ttt_params(
    model: nn.Module,
    *,
    freeze_blocks: int = 0,
    train_last_blocks: int = 0,
    freeze_embeddings: bool = False,
    freeze_prefixes: str = "",
    also_train: str = "",
) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs that TTT updates, in model order.

    - `freeze_blocks=k`: blocks 0 … k−1 are frozen; everything outside the blocks still adapts
      (P639/P610/P578 `TTT_FREEZE_BLOCKS`).
    - `train_last_blocks=N`: only the last N blocks adapt, nothing outside the blocks (P1004,
      whose `TTT_FREEZE_BLOCKS=2` meant this).
    - `freeze_embeddings`: every parameter whose role is "embedding".
    - `freeze_prefixes`: comma-separated name prefixes, e.g. "tok_emb,bigram,ve_shared".
    - `also_train`: comma-separated substrings; a name containing one adapts whatever the rules
      above say (P1004: "norm,scale,lm_head").
    """
    blocks = num_blocks(model)
    prefixes, always = _names(freeze_prefixes), _names(also_train)
    chosen = []
    for name, param in model.named_parameters():
        b = block_index(name)
        trainable = True
        if b is not None and b < freeze_blocks:
            trainable = False
        if train_last_blocks > 0 and (b is None or b < blocks - train_last_blocks):
            trainable = False
        if freeze_embeddings and _is_embedding(param):
            trainable = False
        if any(name.startswith(p) for p in prefixes):
            trainable = False
        if any(s in name for s in always):
            trainable = True
        if trainable:
            chosen.append((name, param))
    return chosen


def ttt_params(model: nn.Module, cfg: EvalConfig) -> list[tuple[str, nn.Parameter]]:
    """The parameters `cfg`'s TTT adapts: every chunk of score-first TTT, LoRA's global phases."""
    return select_ttt_params(
        model,
        freeze_blocks=cfg.ttt_freeze_blocks,
        train_last_blocks=cfg.ttt_train_last_blocks,
        freeze_embeddings=cfg.ttt_freeze_embeddings,
        freeze_prefixes=cfg.ttt_freeze_prefixes,
        also_train=cfg.ttt_also_train,
    )


@contextlib.contextmanager
def only_these_trainable(model: nn.Module, named: list[tuple[str, nn.Parameter]]):
    """Freeze every other parameter (no gradient is even computed); restore the flags after."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    chosen = {id(p) for _, p in named}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


@contextlib.contextmanager
def weights_restored(params: list[nn.Parameter], enabled: bool = True):
    """Put `params` back as they came on the way out, when `enabled`: TTT's result is s_0."""
    saved = [p.detach().clone() for p in params] if enabled else []
    try:
        yield
    finally:
        if enabled:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)


def block_lr_multiplier(name: str, blocks: int, start: float) -> float:
    """Linear from `start` on block 0 to 1.0 on the last block; 1.0 outside the blocks."""
    b = block_index(name)
    if b is None or blocks <= 1:
        return 1.0
    return start + (1.0 - start) * b / (blocks - 1)


def build_optimizer(
    named: list[tuple[str, nn.Parameter]],
    *,
    kind: str,
    lr: float,
    momentum: float,
    betas: tuple[float, float],
    weight_decay: float,
    block_lr_start: float,
    blocks: int,
) -> torch.optim.Optimizer:
    """SGD or AdamW, one param group per LR multiplier; each group keeps its `lr_mult`."""
    by_mult: dict[float, list[nn.Parameter]] = defaultdict(list)
    for name, param in named:
        by_mult[block_lr_multiplier(name, blocks, block_lr_start)].append(param)
    groups = [{"params": ps, "lr": lr * m, "lr_mult": m} for m, ps in by_mult.items()]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay)
    raise ValueError(f"unknown TTT optimizer {kind!r}; expected 'sgd' or 'adamw'")


def ttt_optimizer(
    model: nn.Module, named: list[tuple[str, nn.Parameter]], cfg: EvalConfig
) -> torch.optim.Optimizer:
    """`build_optimizer` with `cfg`'s TTT settings, over `named` (parameters of `model`)."""
    return build_optimizer(
        named,
        kind=cfg.ttt_optimizer,
        lr=cfg.ttt_lr,
        momentum=cfg.ttt_momentum,
        betas=(cfg.ttt_beta1, cfg.ttt_beta2),
        weight_decay=cfg.ttt_weight_decay,
        block_lr_start=cfg.ttt_block_lr_start,
        blocks=num_blocks(model),
    )


# -- learning-rate schedules -----------------------------------------------------------------
def chunk_lr(base_lr: float, chunk: int, schedule_chunks: int, schedule: str) -> float:
    """LR of chunk k: cosine from base_lr at chunk 0 to 0 at chunk K − 1 (SPEC §5.29c)."""
    if schedule == "constant" or schedule_chunks <= 1:
        return base_lr
    progress = min(chunk, schedule_chunks - 1) / (schedule_chunks - 1)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_lr_factor(step: int, steps: int, floor: float, schedule: str) -> float:
    """P639's within-chunk cosine from 1 down to `floor` (three steps: 1.0, 0.55, 0.10)."""
    if schedule != "double_cosine" or steps <= 1:
        return 1.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * step / (steps - 1)))


def set_group_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every param group at `lr` times its own block multiplier."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]


# -- P639's EB-TTT / Born-rule SNR² gradient scaling (SPEC §9.1) ------------------------------
def snr_group_key(name: str) -> str:
    """`blocks.<i>` for block parameters, `<table>.<j>` for list entries, else the first name."""
    parts = name.split(".")
    if len(parts) > 1 and (parts[0] == "blocks" or parts[1].isdigit()):
        return ".".join(parts[:2])
    return parts[0]


@torch.no_grad()
def scale_grads_by_snr_(
    named: list[tuple[str, nn.Parameter]], born: bool, lo: float = 0.3, hi: float = 3.0
) -> dict[str, float]:
    """Multiply each group's gradients by SNR = mean|g| / (std g + 1e-8), or SNR² if `born`.

    Clamped to [lo, hi]. A single-element group has no std; upstream's min/max then fell through
    to the upper clamp, which is reproduced here. Returns the factor used per group.
    """
    groups: dict[str, list[nn.Parameter]] = defaultdict(list)
    for name, param in named:
        if param.grad is not None:
            groups[snr_group_key(name)].append(param)
    factors = {}
    for key, params in groups.items():
        g = torch.cat([p.grad.reshape(-1).float() for p in params])
        snr = (g.abs().mean() / (g.std() + 1e-8)).item() if g.numel() > 1 else math.nan
        scale = snr * snr if born else snr
        scale = hi if not math.isfinite(scale) else min(max(scale, lo), hi)
        for p in params:
            p.grad.mul_(scale)
        factors[key] = scale
    return factors


# -- P578's TTT-EMA ------------------------------------------------------------------------
class WeightEMA:
    """An EMA of the adapted parameters, starting from the artifact weights, used for scoring."""

    def __init__(self, params: list[nn.Parameter], decay: float):
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            s.mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw, strict=True):
                    p.copy_(r)


# -- one optimizer step on a set of sequences ------------------------------------------------
def cut_sequences(num_targets: int, seq_len: int) -> list[tuple[int, int]]:
    """Non-overlapping (start, length) pieces of T targets; the last may be shorter."""
    return [(a, min(seq_len, num_targets - a)) for a in range(0, num_targets, seq_len)]


def step_plan(lengths: list[int], world: World, batch_seqs: int) -> list[tuple[range, int]]:
    """For each step of one epoch: this rank's sequence indices and the step's global targets.

    Sequences are split contiguously over ranks; each rank takes up to `batch_seqs` of its own per
    step (0 = all of them: one full-batch step), as upstream's per-rank TTT_BATCH_SEQS. Every rank
    gets the same number of steps, so the gradient all-reduce always lines up.
    """
    shares = [rank_window_range(len(lengths), r, world.world_size) for r in range(world.world_size)]
    largest = max(len(s) for s in shares)
    per = batch_seqs if batch_seqs > 0 else max(largest, 1)
    plan = []
    for j in range(-(-largest // per)):
        picks = [s[j * per : (j + 1) * per] for s in shares]
        plan.append((picks[world.rank], sum(lengths[i] for p in picks for i in p)))
    return plan


def _step_on_raw_tokens(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    tokens: np.ndarray,
    pieces: list[tuple[int, int]],
    global_targets: int,
    world: World,
    *,
    grad_clip: float,
    snr: str = "",
    snr_clamp: tuple[float, float] = (0.3, 3.0),
) -> float:
    """One step on `pieces` of `tokens` (inputs tokens[a:a+L], targets shifted by one).

    It takes raw tokens, so it is reached only through the two doors below: `train_step`, which
    unwraps tokens the ledger released, and the illegal one, which refuses unless allowed.

    Each rank divides its summed loss by the step's *global* target count before the gradient
    all-reduce (SUM), so the update is the mean over the whole step however the pieces are split.
    Returns this rank's share of the mean loss.
    """
    optimizer.zero_grad(set_to_none=True)
    model.train()
    device = world.device
    by_length: dict[int, list[int]] = defaultdict(list)
    for a, length in pieces:
        by_length[length].append(a)
    loss_total = 0.0
    for length, starts in by_length.items():
        x = torch.from_numpy(np.stack([tokens[a : a + length] for a in starts])).to(device)
        y = torch.from_numpy(np.stack([tokens[a + 1 : a + length + 1] for a in starts])).to(device)
        with autocast_context(device):
            logits = model(x)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum"
        )
        loss = loss / global_targets
        loss.backward()
        loss_total += float(loss.detach())
    params = [p for _, p in named]
    if world.distributed:
        for p in params:
            if p.grad is None:  # a rank with nothing to train on still joins the all-reduce
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    if snr:
        scale_grads_by_snr_(named, born=snr == "born", lo=snr_clamp[0], hi=snr_clamp[1])
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss_total


def train_step(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    data: ScoredTokens,
    pieces: list[tuple[int, int]],
    global_targets: int,
    world: World,
    *,
    grad_clip: float,
    snr: str = "",
    snr_clamp: tuple[float, float] = (0.3, 3.0),
) -> float:
    """One step on `pieces` of tokens the ledger released; anything else raises LedgerViolation."""
    tokens = require_scored(data).tokens
    return _step_on_raw_tokens(
        model,
        named,
        optimizer,
        tokens,
        pieces,
        global_targets,
        world,
        grad_clip=grad_clip,
        snr=snr,
        snr_clamp=snr_clamp,
    )


class IllegalEvaluationError(PgolfError):
    """A ruled-illegal evaluation technique was requested without the research flag."""


def refuse_unless_illegal_allowed(allow_illegal: bool, reason: str) -> None:
    """Raise `IllegalEvaluationError` saying `reason`, unless the run allows illegal settings."""
    if not allow_illegal:
        raise IllegalEvaluationError(
            f"{reason}; it runs only with allow_illegal=True (pgolf run --allow-illegal)"
        )


def train_step_on_unscored_tokens_illegal(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    tokens: np.ndarray,
    pieces: list[tuple[int, int]],
    global_targets: int,
    world: World,
    *,
    grad_clip: float,
    allow_illegal: bool,
) -> float:
    """`train_step` on raw validation tokens no ledger has scored: ILLEGAL (SPEC §1.4, §5.30).

    The one door for P1351's pre-quant TTT (`pgolf.eval.prequant`, its only caller, which a test
    holds to); it refuses unless the run allows illegal settings.
    """
    refuse_unless_illegal_allowed(
        allow_illegal, "training on validation tokens before they are scored breaks SPEC §1.4"
    )
    return _step_on_raw_tokens(
        model, named, optimizer, tokens, pieces, global_targets, world, grad_clip=grad_clip
    )


# -- the chunk trainer -----------------------------------------------------------------------
@dataclass
class ChunkTrainer:
    """§5.29's training on one chunk: E epochs over tokens the ledger released, nothing else."""

    model: nn.Module  # the forward to train through (maybe compiled); `named` are its parameters
    named: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    cfg: EvalConfig
    world: World
    seq_len: int

    def train(self, chunk: ScoredTokens, lr: float) -> int:
        """Every target of `chunk`, E epochs, at chunk LR `lr`; returns the step count."""
        cfg = self.cfg
        chunk = require_scored(chunk)
        pieces = cut_sequences(chunk.num_targets, self.seq_len)
        plan = step_plan([length for _, length in pieces], self.world, cfg.ttt_batch_seqs)
        snr = ("born" if cfg.ttt_snr_born else "snr") if cfg.ttt_snr_scaling else ""
        steps = cfg.ttt_epochs * len(plan)
        step = 0
        for _ in range(cfg.ttt_epochs):
            for mine, global_targets in plan:
                factor = step_lr_factor(step, steps, cfg.ttt_lr_floor, cfg.ttt_lr_schedule)
                set_group_lrs(self.optimizer, lr * factor)
                train_step(
                    self.model,
                    self.named,
                    self.optimizer,
                    chunk,
                    [pieces[i] for i in mine],
                    global_targets,
                    self.world,
                    grad_clip=cfg.ttt_grad_clip,
                    snr=snr,
                    snr_clamp=(cfg.ttt_snr_clamp_min, cfg.ttt_snr_clamp_max),
                )
                step += 1
        return step


# -- the score-first loop --------------------------------------------------------------------
@dataclass
class ChunkRecord:
    index: int
    lo: int  # first target index the chunk scored
    hi: int  # one past its last
    windows: int
    nats: float = 0.0
    bytes: float = 0.0
    tokens: float = 0.0
    lr: float = 0.0
    steps: int = 0
    trained: bool = False
    score_s: float = 0.0
    train_s: float = 0.0


@dataclass
class TTTResult:
    sums: BpbSums  # s_0: the first-pass sums, all ranks
    num_chunks: int  # chunks in the whole stream
    chunks: list[ChunkRecord] = field(default_factory=list)  # those processed (scored)
    trainable: list[str] = field(default_factory=list)
    trainable_params: int = 0
    stopped_by_cap: bool = False
    ledger: ScoredLedger | None = None

    @property
    def chunks_trained(self) -> int:
        return sum(c.trained for c in self.chunks)

    def summary(self) -> dict:
        score = [c.score_s for c in self.chunks]
        train = [c.train_s for c in self.chunks if c.trained]
        return {
            "num_chunks": self.num_chunks,
            "chunks_scored": len(self.chunks),
            "chunks_trained": self.chunks_trained,
            "trainable_params": self.trainable_params,
            "trainable_tensors": len(self.trainable),
            "chunk_score_s_mean": float(np.mean(score)) if score else 0.0,
            "chunk_train_s_mean": float(np.mean(train)) if train else 0.0,
            "chunk_s_max": max((c.score_s + c.train_s for c in self.chunks), default=0.0),
            "stopped_by_cap": self.stopped_by_cap,
        }


def _chunk_bounds(tiling: Tiling, chunk_tokens: int) -> tuple[int, np.ndarray]:
    """Number of chunks and the window-index boundaries of each (SPEC §5.29 step 1)."""
    n = tiling.num_targets
    num_chunks = -(-n // chunk_tokens) if n else 0
    chunk_of = np.minimum(tiling.scored_lo // chunk_tokens, max(num_chunks - 1, 0))
    return num_chunks, np.searchsorted(chunk_of, np.arange(num_chunks + 1), side="left")


def score_first_ttt(
    model: nn.Module,
    tokens: np.ndarray,
    tiling: Tiling,
    byte_tables: TorchByteTables,
    cfg: EvalConfig,
    world: World,
    *,
    batch_windows: int,
    clock: EvalClock,
    documents: DocumentSums | None = None,
    progress: bool = False,
    restore: bool = True,
) -> TTTResult:
    """Run the score-first loop over `tiling`; returns s_0 and per-chunk records.

    The model's weights are put back as they came when `restore` (the adapted weights are of no
    further use: s_0 is the result), and requires_grad flags always are.
    """
    num_chunks, bounds = _chunk_bounds(tiling, cfg.ttt_chunk_tokens)
    processed = min(num_chunks, cfg.ttt_max_chunks) if cfg.ttt_max_chunks > 0 else num_chunks
    schedule_chunks = cfg.ttt_train_chunks if cfg.ttt_train_chunks > 0 else num_chunks
    named = ttt_params(model, cfg)
    params = [p for _, p in named]
    ledger = ScoredLedger(tokens)
    # Scoring and training call this; parameters, flags and restores go through `model`.
    runner = scoring_model(model, cfg.compile, world.device)
    scorer = WindowScorer(
        runner,
        tokens,
        tiling,
        byte_tables,
        world,
        batch_windows,
        cfg.temperature,
        pad_to_full=not cfg.per_document_reset,
        documents=documents,
    )
    result = TTTResult(
        sums=BpbSums(),
        num_chunks=num_chunks,
        trainable=[n for n, _ in named],
        trainable_params=sum(p.numel() for p in params),
        ledger=ledger,
    )
    table = torch.zeros(max(processed, 1), 3, dtype=torch.float64, device=world.device)
    bar = progress_bar(total=processed, desc="eval ttt", enabled=progress and world.is_main)
    was_training = model.training
    with weights_restored(params, restore), only_these_trainable(model, named):
        trainer = None
        if params:
            optimizer = ttt_optimizer(model, named, cfg)
            seq_len = cfg.ttt_seq_len or tiling.seq_len
            trainer = ChunkTrainer(runner, named, optimizer, cfg, world, seq_len)
        ema = WeightEMA(params, cfg.ttt_ema_decay) if cfg.ttt_ema_decay > 0 and params else None
        try:
            for k in range(processed):
                w0, w1 = int(bounds[k]), int(bounds[k + 1])
                if w0 == w1:  # possible only when a window is longer than a chunk
                    continue
                lo, hi = int(tiling.scored_lo[w0]), int(tiling.scored_hi[w1 - 1])
                record = ChunkRecord(index=k, lo=lo, hi=hi, windows=w1 - w0)
                before = dict(clock.laps)
                with clock.lap("score"):
                    acc = _score_chunk(scorer, ledger, world, ema, (w0, w1), record)
                table[k] = acc
                if trainer is not None and _trains_on(k, processed, cfg):
                    with clock.lap("ttt_train"):
                        _train_on_chunk(trainer, ledger, ema, record, schedule_chunks)
                record.score_s = clock.laps["score"] - before.get("score", 0.0)
                record.train_s = clock.laps.get("ttt_train", 0.0) - before.get("ttt_train", 0.0)
                result.chunks.append(record)
                _show_progress(bar, table, k)
                if clock.should_stop():
                    result.stopped_by_cap = True
                    break
        finally:
            bar.close()
            model.train(was_training)
    all_reduce_tensor(table, world)
    for record in result.chunks:
        record.nats, record.bytes, record.tokens = table[record.index].tolist()
    result.sums = sums_from_tensor(table.sum(0))
    return result


def _score_chunk(
    scorer: WindowScorer,
    ledger: ScoredLedger,
    world: World,
    ema: WeightEMA | None,
    windows: tuple[int, int],
    record: ChunkRecord,
) -> torch.Tensor:
    """Score `windows` (with the EMA weights if any) into the ledger, merged over ranks."""
    weights = ema.swapped_in() if ema is not None else contextlib.nullcontext()
    with weights:
        acc, _ = scorer.score_range(*windows, ledger)
    ledger.merge_ranks(record.lo, record.hi, world)
    return acc


def _trains_on(k: int, processed: int, cfg: EvalConfig) -> bool:
    """Whether chunk k is trained on once scored."""
    return (
        cfg.ttt_epochs > 0
        # The last-chunk guard of §5.29; with max_chunks nothing is scored after the last
        # processed chunk either, so training on it would be wasted.
        and k < processed - 1
        and (cfg.ttt_train_chunks <= 0 or k < cfg.ttt_train_chunks)
    )


def _train_on_chunk(
    trainer: ChunkTrainer,
    ledger: ScoredLedger,
    ema: WeightEMA | None,
    record: ChunkRecord,
    schedule_chunks: int,
) -> None:
    """Train on the targets the chunk just scored, as the ledger releases them; then the EMA."""
    cfg = trainer.cfg
    record.lr = chunk_lr(cfg.ttt_lr, record.index, schedule_chunks, cfg.ttt_lr_schedule)
    record.steps = trainer.train(ledger.release(record.lo, record.hi), record.lr)
    record.trained = True
    if ema is not None:
        ema.update()


def _show_progress(bar, table: torch.Tensor, k: int) -> None:
    bar.update(1)
    if not bar.disable:
        nats, nbytes, _ = table[: k + 1].sum(0).tolist()
        bar.set_postfix(bpb=f"{nats / (math.log(2) * nbytes):.4f}" if nbytes else "-")
