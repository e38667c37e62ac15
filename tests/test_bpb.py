"""The BPB byte accounting of SPEC §3, pinned with the real official sp1024 tokenizer.

Each test is one of the pitfalls SPEC §3.4 lists, or one clause of §3.1–3.3.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pgolf.data.tokenizer import BOS_ID, SPACE_MARK, build_byte_tables, load_tokenizer
from pgolf.eval.bpb import BpbSums, TorchByteTables, bits_per_byte, target_bytes


@pytest.fixture(scope="module")
def sp(official_tokenizer_path):
    return load_tokenizer(official_tokenizer_path)


@pytest.fixture(scope="module")
def tables(sp):
    return build_byte_tables(sp)


def _bytes(tables, prev: int, target: int) -> int:
    return int(target_bytes([prev], [target], tables)[0])


def _doc_bytes(tables, ids: list[int]) -> int:
    stream = np.array([BOS_ID, *ids])
    return int(target_bytes(stream[:-1], stream[1:], tables).sum())


def test_control_ids_carry_no_bytes_and_are_boundaries(sp, tables):
    for i in range(4):  # <pad>, <s>, </s>, <unk>
        assert tables.base_bytes[i] == 0 and tables.is_boundary[i]
        assert not tables.has_leading_space[i]
    assert _bytes(tables, prev=sp.piece_to_id("ld"), target=BOS_ID) == 0


def test_the_space_is_counted_only_after_a_non_boundary_token(sp, tables):
    world = sp.piece_to_id(f"{SPACE_MARK}wor")
    assert tables.has_leading_space[world] and tables.base_bytes[world] == 3
    assert _bytes(tables, prev=sp.piece_to_id("o"), target=world) == 4  # " wor"
    assert _bytes(tables, prev=BOS_ID, target=world) == 3  # a document's first word: no space


def test_a_byte_fallback_piece_is_one_byte_not_three(sp, tables):
    ids = sp.encode("€")  # not in the vocabulary: three <0xNN> pieces
    assert [sp.id_to_piece(i) for i in ids] == ["<0xE2>", "<0x82>", "<0xAC>"]
    assert all(tables.base_bytes[i] == 1 and not tables.is_boundary[i] for i in ids)
    assert _doc_bytes(tables, ids) == len("€".encode())
    assert sum(sp.is_byte(i) for i in range(sp.vocab_size())) == 256


def test_a_lone_space_piece_is_zero_base_bytes_plus_the_space(sp, tables):
    lone = sp.piece_to_id(SPACE_MARK)
    assert sp.id_to_piece(lone) == SPACE_MARK
    assert tables.base_bytes[lone] == 0 and tables.has_leading_space[lone]
    assert _bytes(tables, prev=sp.piece_to_id("ld"), target=lone) == 1
    # "world €" encodes as "▁wor ld ▁ <0xE2> <0x82> <0xAC>": the lone ▁ carries the space.
    text = "Hello world €😀 x"
    ids = sp.encode(text)
    assert lone in ids
    assert _doc_bytes(tables, ids) == len(text.encode("utf-8"))


def test_bytes_are_those_of_the_normalised_text_not_the_raw_text(sp, tables):
    text = "Hello  world\nnew line\ttab  "  # whitespace runs collapse, the tail is stripped
    ids = sp.encode(text)
    assert _doc_bytes(tables, ids) == len("Hello world new line tab") < len(text)


def test_bos_targets_add_loss_but_no_bytes(sp, tables):
    prev = np.array([sp.piece_to_id("ld"), BOS_ID])
    target = np.array([BOS_ID, sp.piece_to_id("H")])
    per_target = target_bytes(prev, target, tables)
    assert per_target.tolist() == [0, 1]
    nll = np.array([2.5, 1.0])  # the BOS prediction's loss still counts
    sums = BpbSums()
    sums.add(nll.sum(), per_target.sum(), nll.size)
    assert (sums.nats, sums.bytes, sums.tokens) == (3.5, 1.0, 2.0)
    assert sums.loss == 1.75


def test_bpb_is_nats_over_ln2_times_bytes():
    sums = BpbSums(nats=1000.0, bytes=2400.0, tokens=1000.0)
    assert sums.bpb == pytest.approx(1000.0 / (math.log(2) * 2400.0), rel=1e-15)
    # Equivalently (loss/ln2)·(tokens/bytes), the official formula's form.
    assert sums.bpb == pytest.approx((sums.loss / math.log(2)) * (1000.0 / 2400.0), rel=1e-15)
    assert math.isnan(bits_per_byte(1.0, 0.0))


def test_bpb_sums_merge_to_the_same_score_however_the_stream_is_split():
    rng = np.random.default_rng(0)
    nll = rng.exponential(2.0, size=10_000)
    nbytes = rng.integers(0, 8, size=10_000)
    whole = BpbSums()
    whole.add(nll.sum(), nbytes.sum(), nll.size)
    for cuts in ([5000], [1, 2, 3, 9999], sorted(rng.choice(10_000, size=50, replace=False))):
        merged = BpbSums()
        for part_nll, part_bytes in zip(np.split(nll, cuts), np.split(nbytes, cuts), strict=True):
            part = BpbSums()
            part.add(part_nll.sum(), part_bytes.sum(), part_nll.size)
            merged = merged + part
        assert merged.bytes == whole.bytes and merged.tokens == whole.tokens
        assert merged.bpb == pytest.approx(whole.bpb, rel=1e-12)


def test_torch_tables_agree_with_numpy_on_a_real_stream(sp, tables):
    text = "The Court held, in 1954, that “separate but equal” — naïvely — fails. 😀 Ω"
    stream = np.array([BOS_ID, *sp.encode(text), BOS_ID, *sp.encode("Next doc.")])
    expected = target_bytes(stream[:-1], stream[1:], tables)
    t = torch.as_tensor(stream)
    got = TorchByteTables(tables).target_bytes(t[:-1], t[1:])
    assert got.tolist() == expected.tolist()
    assert expected.sum() == len(sp.decode(sp.encode(text)).encode()) + len(b"Next doc.")


def test_tables_padded_past_the_vocab_score_extra_ids_as_boundaries(sp):
    padded = build_byte_tables(sp, table_size=1100)
    assert padded.size == 1100
    assert not padded.base_bytes[1024:].any() and padded.is_boundary[1024:].all()
