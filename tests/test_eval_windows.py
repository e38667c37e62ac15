"""Window tiling (SPEC §3.5–3.6): a pure function, checked clause by clause over random shapes.

hypothesis is not installed, so the property tests draw their cases from seeded generators.
"""

from __future__ import annotations

import numpy as np
import pytest

from pgolf.data.tokenizer import BOS_ID
from pgolf.eval.windows import (
    build_tiling,
    document_starts,
    nonoverlapping_tiling,
    sliding_tiling,
)


def _times_scored(tiling) -> np.ndarray:
    """How often each target index is scored (a difference array over the scored ranges)."""
    diff = np.zeros(tiling.num_targets + 1, dtype=np.int64)
    np.add.at(diff, tiling.scored_lo, 1)
    np.add.at(diff, tiling.scored_hi, -1)
    return np.cumsum(diff)[: tiling.num_targets]


def _random_cases(seed: int, count: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        seq_len = int(rng.integers(1, 80))
        stride = int(rng.integers(1, seq_len + 1))
        yield seq_len, stride, int(rng.integers(0, 600))


def _check_shape(tiling, seq_len: int) -> None:
    assert np.all(tiling.lengths >= 1) and np.all(tiling.lengths <= seq_len)
    assert np.all(tiling.score_from < tiling.lengths)  # every window scores something
    assert np.all(tiling.scored_hi <= tiling.num_targets)  # inputs and targets inside the stream
    assert np.all(np.diff(tiling.scored_lo) > 0)  # stream order


def test_sliding_windows_score_every_target_exactly_once():
    for seq_len, stride, n in _random_cases(seed=0, count=400):
        tiling = sliding_tiling(n, seq_len, stride)
        _check_shape(tiling, seq_len)
        assert np.all(_times_scored(tiling) == 1), (seq_len, stride, n)
        assert tiling.num_scored == n
        # Each window's scored range starts exactly where the previous one stopped.
        assert np.array_equal(tiling.scored_hi[:-1], tiling.scored_lo[1:])


def test_every_target_after_the_first_window_sees_at_least_T_minus_s_context():
    for seq_len, stride, n in _random_cases(seed=1, count=400):
        tiling = sliding_tiling(n, seq_len, stride)
        later = tiling.starts > 0
        assert np.all(tiling.score_from[later] == seq_len - stride)
        if len(tiling):
            assert tiling.starts[0] == 0 and tiling.score_from[0] == 0
        # Context of a scored target t in window w is t − start ≥ score_from.
        assert np.all(tiling.scored_lo - tiling.starts >= np.where(later, seq_len - stride, 0))


def test_the_s1413_validation_stream_needs_633409_windows():
    n, seq_len, stride = 40_540_160, 2048, 64
    tiling = sliding_tiling(n, seq_len, stride)
    assert len(tiling) == 633_409
    assert tiling.num_scored == n == 2048 + 633_408 * 64
    assert tiling.starts[-1] == 633_408 * 64 and tiling.lengths[-1] == 2048
    assert np.all(tiling.lengths == 2048)  # n − T is a multiple of s here: no short window


def test_nonoverlapping_windows_trim_the_tail_like_the_official_eval():
    for seq_len, _, n in _random_cases(seed=2, count=200):
        tiling = nonoverlapping_tiling(n, seq_len)
        assert len(tiling) == n // seq_len
        assert np.all(tiling.score_from == 0) and np.all(tiling.lengths == seq_len)
        counts = _times_scored(tiling)
        assert np.all(counts[: n // seq_len * seq_len] == 1)
        assert np.all(counts[n // seq_len * seq_len :] == 0)


def test_stride_equal_to_the_window_is_nonoverlapping_plus_the_short_tail():
    sliding = sliding_tiling(1000, 64, 64)
    plain = nonoverlapping_tiling(1000, 64)
    assert np.array_equal(sliding.starts[: len(plain)], plain.starts)
    assert np.array_equal(sliding.lengths[: len(plain)], plain.lengths)
    assert len(sliding) == len(plain) + 1 and sliding.lengths[-1] == 1000 - 15 * 64


def _stream_with_documents(rng, n_tokens: int) -> np.ndarray:
    tokens = rng.integers(2, 1024, size=n_tokens)
    tokens[rng.random(n_tokens) < 0.03] = BOS_ID
    return tokens


def test_per_document_windows_never_read_across_a_bos_and_cover_every_target_once():
    rng = np.random.default_rng(3)
    for seq_len, stride, n in _random_cases(seed=3, count=200):
        tokens = _stream_with_documents(rng, n + 1)
        tiling = build_tiling(tokens, seq_len, "sliding", stride, per_document_reset=True)
        _check_shape(tiling, seq_len)
        assert np.all(_times_scored(tiling) == 1)
        for start, length in zip(tiling.starts, tiling.lengths, strict=True):
            inputs = tokens[start : start + length]
            assert not np.any(inputs[1:] == BOS_ID)  # a BOS may only open the window
        first_of_doc = np.isin(tiling.starts, document_starts(tokens))
        assert np.all(tiling.score_from[first_of_doc] == 0)


def test_per_document_nonoverlapping_keeps_each_documents_tail():
    tokens = np.array([BOS_ID, 5, 6, 7, 8, BOS_ID, 9, 10, BOS_ID, 11])
    tiling = build_tiling(tokens, 3, "nonoverlapping", 64, per_document_reset=True)
    assert tiling.starts.tolist() == [0, 3, 5, 8]
    assert tiling.lengths.tolist() == [3, 2, 3, 1]
    assert tiling.num_scored == len(tokens) - 1


def test_document_starts_are_bos_input_positions():
    tokens = np.array([7, BOS_ID, 3, 4, BOS_ID, 5, BOS_ID])
    # The final BOS is only ever a target (the end of the last document), never an input.
    assert document_starts(tokens).tolist() == [0, 1, 4]
    assert document_starts(np.array([BOS_ID])).size == 0


@pytest.mark.parametrize(
    "args, fragment",
    [((100, 0, 1), "window length"), ((100, 8, 9), "stride"), ((100, 8, 0), "stride")],
)
def test_impossible_tilings_are_refused(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        sliding_tiling(*args)


def test_an_empty_stream_has_no_windows():
    assert len(sliding_tiling(0, 8, 4)) == 0 and len(nonoverlapping_tiling(0, 8)) == 0
    assert len(build_tiling(np.array([BOS_ID]), 8, "sliding", 4, per_document_reset=True)) == 0
