"""Where calibration inputs come from: training shards or the model's own samples. Never val.

The rules (SPEC §1.3, §1.2): validation data may not shape the artifact, and anything that reads
training data counts as training time. So:
- `train_batches` takes only official training shard names (`fineweb_train_NNNNNN.bin`) and refuses
  a validation shard outright, whether it comes as a path list or inside a DistributedTokenLoader;
  there is no switch that lets validation tokens through;
- its caller (`pgolf.quant.pipeline.calibrate`) times the whole calibration and charges the
  seconds to training via the calibration reserve (`train.gptq_reserve_seconds`).
- `self_generated` (SPEC §5.23) samples sequences from the trained model itself: no data at all.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from pgolf.errors import PgolfError
from pgolf.train.loader import DistributedTokenLoader

_TRAIN_SHARD = re.compile(r"^fineweb_train_\d{6}\.bin$")


def require_train_shards(paths: Sequence[str | Path], val_paths: Sequence[str | Path] = ()) -> None:
    """Raise unless every path is an official training shard and none is a validation file."""
    if not paths:
        raise PgolfError("calibration: no training shards given")
    val = {Path(p).resolve() for p in val_paths}
    for p in map(Path, paths):
        if "fineweb_val_" in p.name or p.resolve() in val:
            raise PgolfError(
                f"{p}: validation data cannot be a calibration source (SPEC §1.2: the artifact may "
                "not be fitted to validation tokens)"
            )
        if not _TRAIN_SHARD.match(p.name):
            raise PgolfError(
                f"{p}: calibration reads only training shards named fineweb_train_NNNNNN.bin"
            )


def train_batches(
    source: DistributedTokenLoader | Sequence[str | Path],
    num_batches: int,
    batch_tokens: int,
    seq_len: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    val_paths: Sequence[str | Path] = (),
) -> Iterator[Tensor]:
    """`num_batches` input-id batches of `batch_tokens` (global) tokens from training shards.

    Pass the trainer's loader to continue its stream (P1351: calibration sees fresh tokens) or a
    list of shard paths for a fresh stream from the first shard (P639/S1060).
    """
    if isinstance(source, DistributedTokenLoader):
        require_train_shards(source.stream.paths, val_paths)
        loader = source
    else:
        require_train_shards(source, val_paths)
        loader = DistributedTokenLoader(
            [Path(p) for p in source], rank, world_size, torch.device(device)
        )
    if batch_tokens < seq_len * loader.world_size:
        raise PgolfError(
            f"calibration batch of {batch_tokens} tokens is smaller than one {seq_len}-token "
            f"sequence per rank ({loader.world_size} ranks)"
        )
    for _ in range(num_batches):
        x, _y = loader.next_batch(batch_tokens, seq_len, 1)
        yield x


StepFn = Callable[[Tensor], Tensor]  # token ids [B, t] -> next-token logits [B, V]


def windowed_step(model: nn.Module, context: int = 0) -> StepFn:
    """Next-token logits by re-running the model on the last `context` tokens (0 = all).

    Model-agnostic, so it works for any architecture; with a fixed context the cost per token is
    constant and generation is linear in length. With context 0 it is S1019's exact full
    re-forward, quadratic in length.
    """

    def step(ids: Tensor) -> Tensor:
        window = ids if context <= 0 else ids[:, -context:]
        return model(window)[:, -1, :].float()

    return step


def cached_step(model: nn.Module) -> StepFn:
    """Next-token logits from a fresh KV cache (`GPT.new_cache`), fed only the unseen tokens.

    The same logits as the full re-forward up to float rounding (tested to 1e-5 in fp32), at the
    cost of one position per step. One cache per batch of sequences: make a new step for each.
    """
    cache = model.new_cache()

    def step(ids: Tensor) -> Tensor:
        return model(ids[:, cache.length :], cache)[:, -1, :].float()

    return step


@contextlib.contextmanager
def upstream_precision(device: torch.device):
    """bf16 autocast with TF32 matmuls allowed, as S1019 generates (its main() sets TF32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def self_generated(
    model: nn.Module,
    count: int,
    length: int,
    *,
    vocab_size: int,
    temperature: float = 0.8,
    seed: int = 1337,
    batch_size: int = 8,
    context: int = 0,
    kv_cache: bool = True,
    device: torch.device | str = "cpu",
    bf16: bool | None = None,
) -> Iterator[Tensor]:
    """Batches of `count` sequences × `length` tokens sampled from the model (SPEC §5.23).

    First token uniform over the vocabulary, then softmax(logits / temperature), all draws from
    one seeded generator in S1019's order, so the same model and seed give the same tokens.
    `bf16` (default: on CUDA) samples as S1019 did: under bf16 autocast with TF32, the
    temperature dividing the bf16 logits in bf16 and autocast choosing the softmax's dtype (fp32
    on CUDA). With `kv_cache` and context 0 a model that has one (`new_cache`) decodes
    incrementally instead of S1019's full re-forward per token: the same tokens in fp32; in
    bf16 the two round differently, so a near-tie may now and then sample another token.
    """
    if temperature <= 0:
        raise PgolfError(f"self-generated calibration: temperature must be > 0, got {temperature}")
    device = torch.device(device)
    bf16 = device.type == "cuda" if bf16 is None else bf16
    was_training = model.training
    model.eval()
    incremental = kv_cache and context <= 0 and hasattr(model, "new_cache")
    gen = torch.Generator(device=device).manual_seed(seed)
    try:
        for start in range(0, count, batch_size):
            b = min(batch_size, count - start)
            step = cached_step(model) if incremental else windowed_step(model, context)
            ids = torch.randint(0, vocab_size, (b, 1), generator=gen, device=device)
            # Only the sampling runs in this precision: the caller's Hessian forwards do not.
            with upstream_precision(device) if bf16 else contextlib.nullcontext():
                for _ in range(length - 1):
                    logits = step(ids)
                    if bf16:
                        # pgolf's logits are fp32 copies of bf16 values: the cast back is exact.
                        logits = logits.bfloat16()
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=gen)
                    ids = torch.cat([ids, nxt], dim=1)
            yield ids
    finally:
        model.train(was_training)
