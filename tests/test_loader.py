import numpy as np
import torch

from pgolf.data.shards import write_shard
from pgolf.train.loader import DistributedTokenLoader, TokenStream

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
