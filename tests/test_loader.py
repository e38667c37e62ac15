"""Training loaders (SPEC §5.27): sequential stream, coprime-stride walk, shuffled sequences."""

import io
import math

import numpy as np
import pytest
import torch

from pgolf.data.shards import read_shard, write_shard
from pgolf.errors import PgolfError
from pgolf.train.loader import (
    CoprimeStrideLoader,
    DistributedTokenLoader,
    ShuffledSequenceLoader,
    TokenStream,
    build_train_loader,
    fnv_path_seed,
)

CPU = torch.device("cpu")


def _shards(tmp_path, sizes, seed=0):
    rng = np.random.default_rng(seed)
    paths, parts = [], []
    for i, n in enumerate(sizes):
        tokens = rng.integers(0, 1024, size=n, dtype=np.uint16)
        path = tmp_path / f"fineweb_train_{i:06d}.bin"
        write_shard(path, tokens)
        paths.append(path)
        parts.append(tokens)
    return paths, np.concatenate(parts)


def test_stream_crosses_shards_in_order_and_wraps_around(tmp_path):
    paths, all_tokens = _shards(tmp_path, [100, 37, 250])
    stream = TokenStream(paths)
    got = np.concatenate([stream.take(n) for n in (90, 50, 200, 47, 30)])
    expected = np.concatenate([all_tokens, all_tokens[:30]])
    assert np.array_equal(got, expected)


def test_ranks_read_disjoint_slices_whose_union_is_the_single_process_batch(tmp_path):
    paths, _ = _shards(tmp_path, [5000, 5000])
    seq, batch = 16, 256
    single = DistributedTokenLoader(paths, 0, 1, CPU)
    ranks = [DistributedTokenLoader(paths, r, 2, CPU) for r in range(2)]
    for _ in range(3):  # one optimizer step: 8 micro-steps alone, 4 per rank with 2 ranks
        alone = [single.next_batch(batch, seq, 8) for _ in range(8)]
        paired = [[loader.next_batch(batch, seq, 4) for loader in ranks] for _ in range(4)]
        flat_alone = torch.cat([torch.cat([x[:, :1], y], 1).flatten() for x, y in alone])
        flat_pair = torch.cat(
            [torch.cat([x[:, :1], y], 1).flatten() for pair in paired for x, y in pair]
        )
        assert torch.equal(flat_alone, flat_pair)
        r0, r1 = paired[0]
        assert not torch.equal(r0[0], r1[0])


def test_targets_are_inputs_shifted_by_one(tmp_path):
    paths, all_tokens = _shards(tmp_path, [3000])
    x, y = DistributedTokenLoader(paths, 0, 1, CPU).next_batch(512, 32, 2)
    assert x.shape == (8, 32) and y.shape == (8, 32)
    flat = all_tokens[:257].astype(np.int64)
    assert np.array_equal(x.flatten().numpy(), flat[:-1])
    assert np.array_equal(y.flatten().numpy(), flat[1:])


def test_loader_resumes_from_its_saved_position(tmp_path):
    paths, _ = _shards(tmp_path, [700, 900])
    a = DistributedTokenLoader(paths, 0, 1, CPU)
    for _ in range(5):
        a.next_batch(256, 16, 1)
    b = DistributedTokenLoader(paths, 0, 1, CPU)
    b.load_state_dict(a.state_dict())
    for _ in range(7):
        xa, ya = a.next_batch(256, 16, 1)
        xb, yb = b.next_batch(256, 16, 1)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --- the shuffling loaders (SPEC §5.27b, c) ---------------------------------------------------


def _reference_coprime_windows(paths, calls, global_rows, seq_len, world_size):
    """S1060's walk written out plainly (SPEC §5.27b), one list of windows per call."""
    n_tok = [len(read_shard(p)) for p in paths]
    seed = 0
    for p in paths:
        for byte in str(p).encode():
            seed = ((seed ^ byte) * 1099511628211) % 2**64
    rng = np.random.Generator(np.random.PCG64(seed))
    cur = {}  # shard → [phase, count, start, stride, next]

    def redraw(si):
        max_phase = min(seq_len - 1, max(0, n_tok[si] - seq_len - 1))
        phase = int(rng.integers(max_phase + 1)) if max_phase > 0 else 0
        count = (n_tok[si] - 1 - phase) // seq_len
        start = int(rng.integers(count)) if count > 1 else 0
        stride = 1
        while count > 1:
            stride = int(rng.integers(1, count))
            if math.gcd(stride, count) == 1:
                break
        cur[si] = [phase, count, start, stride, 0]

    eligible = [i for i, n in enumerate(n_tok) if (n - 1) // seq_len > 0]
    out = []
    for call in range(calls):
        progress = min(call / 1800, 1.0)
        rem = np.array(
            [
                max(cur[i][1] - cur[i][4], 1) if i in cur else (n_tok[i] - 1) // seq_len
                for i in eligible
            ],
            dtype=np.float64,
        )
        probs = rem ** (0.9 - 0.4 * progress)
        probs = probs / probs.sum()
        ne = len(eligible)
        low = min(max(8, world_size), ne, global_rows)
        high = min(max(32, 8 * world_size), ne, global_rows)
        mix = max(1, min(int(round(low + progress * (high - low))), ne, global_rows))
        chosen = rng.choice(ne, size=mix, replace=False, p=probs)
        counts = np.ones(mix, dtype=np.int64)
        if global_rows > mix:
            counts += rng.multinomial(global_rows - mix, probs[chosen] / probs[chosen].sum())
        perm = rng.permutation(mix)
        buckets = []
        for j in perm:
            si = eligible[chosen[j]]
            b = []
            for _ in range(counts[j]):
                if si not in cur or cur[si][4] >= cur[si][1]:
                    redraw(si)
                phase, count, start, stride, k = cur[si]
                b.append((si, phase + ((start + k * stride) % count) * seq_len))
                cur[si][4] += 1
            if len(b) > 1:
                b = [b[i] for i in rng.permutation(len(b))]
            buckets.append(b)
        windows = []
        live = [b for b in buckets if b]
        while live:
            nxt = []
            for i in rng.permutation(len(live)):
                windows.append(live[i].pop())
                if live[i]:
                    nxt.append(live[i])
            live = nxt
        out.append(windows)
    return out


def test_coprime_loader_reproduces_the_s1060_walk_draw_for_draw(tmp_path):
    paths, _ = _shards(tmp_path, [900, 2000, 37, 1500, 3000, 700, 1200, 2500, 400, 1800])
    loader = CoprimeStrideLoader(paths, 0, 1, CPU)
    got = [loader.sample_windows(24, 16) for _ in range(40)]
    assert got == _reference_coprime_windows(paths, 40, 24, 16, 1)
    assert fnv_path_seed(paths) != fnv_path_seed(paths[::-1])  # the seed hashes the path list


class _TakeOrder(CoprimeStrideLoader):
    """Records windows in the order the walks hand them out (before the per-step shuffles)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.taken: dict[int, list[int]] = {}

    def _take(self, si, count, seq_len):
        out = super()._take(si, count, seq_len)
        self.taken.setdefault(si, []).extend(pos for _, pos in out)
        return out


def test_coprime_loader_reads_every_block_of_a_shard_once_per_epoch(tmp_path):
    sizes = [1000, 777, 1500]
    paths, _ = _shards(tmp_path, sizes)
    seq = 16
    loader = _TakeOrder(paths, 0, 1, CPU)
    # 1,200 windows over 203 blocks: ≈ 6 epochs per shard. The walk is seeded by the paths (as
    # S1060's), i.e. by tmp_path, so the margin must hold for any draw, not one lucky seed.
    for _ in range(150):
        loader.sample_windows(8, seq)
    for si, positions in loader.taken.items():
        epochs = 0
        while positions:  # consecutive epochs, each with its own phase, start and stride
            phase = positions[0] % seq
            count = (sizes[si] - 1 - phase) // seq
            if len(positions) < count:
                break
            epoch, positions = positions[:count], positions[count:]
            assert sorted(epoch) == [phase + k * seq for k in range(count)]
            epochs += 1
        assert epochs >= 3


def test_shuffling_loaders_give_ranks_disjoint_windows_and_inputs_match_the_shards(tmp_path):
    paths, _ = _shards(tmp_path, [1200, 900, 1600, 1100])
    tokens = [np.asarray(read_shard(p)).astype(np.int64) for p in paths]
    for kind in ("coprime", "shuffled"):
        ranks = [build_train_loader(kind, paths, r, 2, CPU) for r in range(2)]
        for _ in range(30):  # well past one epoch of the shuffled loader's shards
            windows = []
            for loader in ranks:
                x, y = loader.next_batch(256, 16, 2)  # 4 rows per rank and micro-step
                assert x.shape == (4, 16)
                for row, (si, pos) in enumerate(loader.last_windows):
                    assert np.array_equal(x[row].numpy(), tokens[si][pos : pos + 16])
                    assert np.array_equal(y[row].numpy(), tokens[si][pos + 1 : pos + 17])
                windows += loader.last_windows
            assert len(set(windows)) == len(windows), kind


def test_shuffled_loader_owns_shards_by_rank_and_visits_each_sequence_once_per_epoch(tmp_path):
    paths, _ = _shards(tmp_path, [500, 800, 650, 300])
    seq = 16
    for rank in range(2):
        loader = ShuffledSequenceLoader(paths, rank, 2, CPU)
        first = []
        loader.next_batch(32 * 2 * 1, seq, 1)  # 2 rows: starts the epoch
        first += loader.last_windows
        total = sum(len(s) for s in loader.starts) + len(first)
        while len(first) < total:
            loader.next_batch(32 * 2 * 1, seq, 1)
            first += loader.last_windows
        first = first[:total]
        assert {si for si, _ in first} == {rank, rank + 2}
        assert len(set(first)) == total  # every sequence once …
        for si in (rank, rank + 2):
            starts = sorted(pos for s, pos in first if s == si)
            phase = starts[0] % seq
            n = len(read_shard(paths[si]))
            assert starts == [phase + k * seq for k in range((n - 1 - phase) // seq)]  # … all


@pytest.mark.parametrize("kind", ["coprime", "shuffled"])
def test_shuffling_loaders_resume_from_a_saved_state(tmp_path, kind):
    paths, _ = _shards(tmp_path, [700, 900, 1300])
    a = build_train_loader(kind, paths, 0, 1, CPU)
    for _ in range(9):
        a.next_batch(128, 16, 1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # as in a checkpoint: weights_only must read it back
    buf.seek(0)
    b = build_train_loader(kind, paths, 0, 1, CPU)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(20):
        xa, ya = a.next_batch(128, 16, 1)
        xb, yb = b.next_batch(128, 16, 1)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_seeds_change_the_order_deterministically(tmp_path):
    paths, _ = _shards(tmp_path, [700, 900, 1300])
    for kind in ("coprime", "shuffled"):
        runs = [build_train_loader(kind, paths, 0, 1, CPU, seed=s) for s in (0, 0, 5)]
        batches = [loader.next_batch(128, 16, 1)[0] for loader in runs]
        assert torch.equal(batches[0], batches[1])
        assert not torch.equal(batches[0], batches[2])
    with pytest.raises(PgolfError, match="unknown train.train_loader"):
        build_train_loader("random", paths, 0, 1, CPU)
    with pytest.raises(PgolfError, match="leave rank 3 with none"):
        ShuffledSequenceLoader(paths, 3, 4, CPU)
