"""The window scorer and `evaluate` (SPEC §3.3–3.6): exact sums, exact bytes, any split of ranks."""

from __future__ import annotations

import copy
import functools
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pgolf.data.inspect import inspect_path
from pgolf.data.shards import read_shard
from pgolf.data.tokenizer import build_byte_tables, load_tokenizer
from pgolf.dist import World
from pgolf.eval.bpb import TorchByteTables
from pgolf.eval.config import EvalConfig
from pgolf.eval.evaluate import evaluate
from pgolf.eval.score import score_nonoverlapping
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT
from tests.conftest import DEV_SHARD, OFFICIAL_TOKENIZER, free_port, join_cpu_world

CPU_WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TRAIN_SEQ_LEN = 64


# -- helpers shared with test_ttt.py ---------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _stream() -> np.ndarray:
    return np.asarray(read_shard(DEV_SHARD)).astype(np.uint16)


def stream_tokens(count: int, offset: int = 300_000) -> np.ndarray:
    """`count` official sp1024 tokens from the dev shard (away from what the model trained on)."""
    return _stream()[offset : offset + count].copy()


@functools.lru_cache(maxsize=1)
def byte_tables() -> TorchByteTables:
    return TorchByteTables(build_byte_tables(load_tokenizer(OFFICIAL_TOKENIZER), 1024))


@functools.lru_cache(maxsize=1)
def _trained_tiny_model() -> GPT:
    """2 layers × 64, trained for a few dozen Adam steps so predictions are far from uniform."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.from_numpy(_stream()[: 40 * 8 * TRAIN_SEQ_LEN + 1].astype(np.int64))
    for step in range(40):
        chunk = data[step * 8 * TRAIN_SEQ_LEN : (step + 1) * 8 * TRAIN_SEQ_LEN + 1]
        x, y = chunk[:-1].view(8, -1), chunk[1:].view(8, -1)
        opt.zero_grad()
        model.loss(x, y).backward()
        opt.step()
    return model.eval()


def tiny_model() -> GPT:
    return copy.deepcopy(_trained_tiny_model())


def run_eval(model, tokens, world=CPU_WORLD, **settings) -> dict:
    return evaluate(
        model, tokens, byte_tables(), EvalConfig(**settings), world, train_seq_len=TRAIN_SEQ_LEN
    )


# -- tests -----------------------------------------------------------------------------------
def test_sliding_with_stride_equal_to_the_window_equals_the_nonoverlapping_scorer():
    tokens = stream_tokens(40 * 64 + 1)  # a whole number of windows: nothing trimmed
    model = tiny_model()
    reference = score_nonoverlapping(model, tokens, 64, 8 * 64, byte_tables(), CPU_WORLD)
    got = run_eval(model, tokens, eval_mode="sliding", eval_stride=64, eval_batch_windows=8)
    assert got["val_tokens"] == reference.tokens == 40 * 64
    assert got["val_bytes"] == reference.bytes
    assert got["val_nats"] == pytest.approx(reference.nats, rel=1e-12, abs=0)
    # The default mode is the official non-overlapping eval, with its trimmed tail.
    untrimmed = stream_tokens(40 * 64 + 30)
    reference = score_nonoverlapping(model, untrimmed, 64, 524_288, byte_tables(), CPU_WORLD)
    default = run_eval(model, untrimmed)
    assert default["eval_mode"] == "nonoverlapping" and default["val_tokens"] == 40 * 64
    assert default["val_nats"] == pytest.approx(reference.nats, rel=1e-12, abs=0)
    assert default["coverage"] == pytest.approx(40 * 64 / (40 * 64 + 29))
    # the 29 tail targets are trimmed as the official eval does: full coverage all the same
    assert default["val_tokens"] == default["scorable_targets"] and not default["partial"]


def test_a_full_sliding_pass_counts_exactly_the_official_bytes_of_the_stream(tiny_dataset):
    official = inspect_path(tiny_dataset)["splits"]["val"]
    tokens = np.asarray(read_shard(tiny_dataset / "fineweb_val_000000.bin"))
    model = tiny_model()
    sliding = run_eval(model, tokens, eval_mode="sliding", eval_seq_len=128, eval_stride=64)
    assert sliding["val_tokens"] == official["targets"] == len(tokens) - 1
    assert sliding["val_bytes"] == official["target_bytes"]
    assert sliding["windows"] == -(-(len(tokens) - 1 - 64) // 64)
    assert sliding["ledger_targets"] == sliding["val_tokens"]
    # Per-document reset changes the context of each prediction, not what is scored.
    reset = run_eval(
        model,
        tokens,
        eval_mode="sliding",
        eval_seq_len=128,
        eval_stride=64,
        per_document_reset=True,
        per_document_sums=True,
    )
    assert reset["val_tokens"] == sliding["val_tokens"]
    assert reset["val_bytes"] == sliding["val_bytes"]
    assert reset["val_nats"] != sliding["val_nats"]
    # Targets before the first BOS form a document of their own (this shard starts mid-document).
    assert reset["documents"]["documents"] == official["documents"] + (tokens[0] != 1)


def test_padding_and_batching_never_change_the_sums():
    tokens = stream_tokens(1500)
    model = tiny_model()
    for reset in (False, True):
        settings = dict(eval_mode="sliding", eval_stride=24, per_document_reset=reset)
        one = run_eval(model, tokens, eval_batch_windows=1, **settings)
        many = run_eval(model, tokens, eval_batch_windows=13, **settings)
        assert many["val_tokens"] == one["val_tokens"] == 1499
        assert many["val_bytes"] == one["val_bytes"]
        assert many["val_nats"] == pytest.approx(one["val_nats"], rel=1e-6)


def test_per_document_sums_add_up_to_the_total():
    tokens = stream_tokens(3000)
    result = run_eval(tiny_model(), tokens, eval_mode="sliding", per_document_sums=True)
    docs = result["documents"]
    assert docs["documents"] == int(np.sum(tokens[1:-1] == 1)) + 1
    assert np.isfinite(docs["macro_bpb"])


def test_windows_longer_than_the_training_length_are_scored_consistently():
    tokens = torch.from_numpy(stream_tokens(257).astype(np.int64))[None]
    model = tiny_model()
    with torch.no_grad():
        short = model(tokens[:, :TRAIN_SEQ_LEN])
        long = model(tokens[:, : 4 * TRAIN_SEQ_LEN])
    # Causal attention + RoPE tables built for any length: the prefix does not see the rest.
    torch.testing.assert_close(long[:, :TRAIN_SEQ_LEN], short, rtol=1e-4, atol=1e-4)
    result = run_eval(model, stream_tokens(2049), eval_mode="sliding", eval_seq_len=256)
    assert result["eval_seq_len"] == 256 and np.isfinite(result["val_bpb"])


def test_temperature_is_one_unless_set_and_is_recorded():
    assert EvalConfig().temperature == 1.0
    tokens = stream_tokens(1025)
    model = tiny_model()
    plain = run_eval(model, tokens)
    assert plain["temperature"] == 1.0
    warm = run_eval(model, tokens, temperature=0.98)
    assert warm["val_nats"] != plain["val_nats"]
    assert warm["temperature"] == 0.98  # recorded for pgolf.rules.temperature to judge


def test_the_eval_cap_warns_or_stops_and_a_stop_is_reported_as_partial():
    tokens = stream_tokens(2049)
    model = tiny_model()
    with pytest.warns(RuntimeWarning, match="cap"):
        warned = run_eval(
            model, tokens, eval_mode="sliding", eval_batch_windows=4, eval_time_cap_s=1e-9
        )
    assert warned["time"]["over_cap"] and not warned["partial"] and warned["coverage"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        stopped = run_eval(
            model,
            tokens,
            eval_mode="sliding",
            eval_batch_windows=1,
            eval_time_cap_s=1e-9,
            eval_time_cap_action="stop",
        )
    assert stopped["partial"] and "cap" in stopped["partial_reason"]
    assert 0 < stopped["coverage"] < 1
    assert stopped["val_tokens"] < stopped["scorable_targets"]
    assert {"total_s", "score_s", "cap_s"} <= set(stopped["time"])


# -- two gloo processes ----------------------------------------------------------------------
TTT_SETTINGS = dict(
    eval_mode="sliding",
    eval_stride=32,
    eval_batch_windows=4,
    ttt_enabled=True,
    ttt_chunk_tokens=512,
    ttt_epochs=1,
    ttt_lr=0.05,
)


def _rank_worker(rank, world_size, port, out_dir, state):
    from pgolf.dist import shutdown

    world = join_cpu_world(rank, world_size, port)
    model = GPT(ModelConfig(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2))
    model.load_state_dict(state)
    tokens = stream_tokens(2049)
    plain = run_eval(model, tokens, world, eval_mode="sliding", eval_stride=32)
    ttt = run_eval(model, tokens, world, **TTT_SETTINGS)
    torch.save({"plain": plain, "ttt": ttt}, out_dir / f"rank{rank}.pt")
    shutdown(world)


def test_two_gloo_ranks_give_the_sums_of_one_process(tmp_path):
    tokens = stream_tokens(2049)
    plain = run_eval(tiny_model(), tokens, eval_mode="sliding", eval_stride=32)
    ttt = run_eval(tiny_model(), tokens, **TTT_SETTINGS)
    state = tiny_model().state_dict()
    mp.spawn(_rank_worker, args=(2, free_port(), tmp_path, state), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["plain"]["val_tokens"] == plain["val_tokens"] == 2048
        assert got["plain"]["val_bytes"] == plain["val_bytes"]
        assert got["plain"]["val_nats"] == pytest.approx(plain["val_nats"], rel=1e-9)
        assert got["plain"]["ledger_targets"] == got["plain"]["val_tokens"]
        # TTT: same chunks, same updates (gradients summed over ranks), so the same s_0.
        assert got["ttt"]["val_tokens"] == ttt["val_tokens"] == 2048
        assert got["ttt"]["val_bytes"] == ttt["val_bytes"]
        assert got["ttt"]["val_nats"] == pytest.approx(ttt["val_nats"], rel=1e-5)
        assert got["ttt"]["ttt"]["chunks_trained"] == ttt["ttt"]["chunks_trained"] == 3
