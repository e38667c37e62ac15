"""The official shard format (SPEC §2.3): exact bytes, header validation, splitting."""

from __future__ import annotations

import numpy as np
import pytest

from pgolf.data import shards as shards_module
from pgolf.data.shards import (
    HEADER_BYTES,
    SHARD_MAGIC,
    ShardWriter,
    check_token_ids,
    find_shards,
    load_tokens,
    read_header,
    read_shard,
    shard_name,
    write_shard,
)
from pgolf.data.tokenizer import BOS_ID
from pgolf.errors import PgolfError
from tests.conftest import DEV_SHARD


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    tokens[:2] = [0, 65535]  # both ends of the uint16 range survive the round trip
    return tokens


def test_write_then_read_is_bit_exact_and_header_matches_spec(tmp_path):
    tokens = _tokens(5000)
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * tokens.size
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, tokens.size]
    assert not header[3:].any()
    assert raw[HEADER_BYTES:] == tokens.astype("<u2").tobytes()
    assert np.array_equal(read_shard(path, mmap=False), tokens)


def test_read_shard_memory_maps_by_default(tmp_path):
    path = tmp_path / "s.bin"
    tokens = _tokens(1000)
    write_shard(path, tokens)
    mapped = read_shard(path)
    assert isinstance(mapped, np.memmap)
    assert mapped.dtype == np.dtype("<u2")
    assert np.array_equal(mapped, tokens)


def test_empty_shard_round_trips(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.empty(0, dtype=np.uint16))
    assert read_header(path) == 0
    assert read_shard(path).size == 0


def test_shard_writer_splits_a_stream_across_numbered_shards(tmp_path):
    # Documents of assorted lengths straddle shard boundaries, as in the official exporter.
    rng = np.random.default_rng(1)
    docs = [np.concatenate(([BOS_ID], rng.integers(4, 1024, size=n))) for n in (5, 700, 1, 333)]
    writer = ShardWriter(tmp_path, "train", shard_tokens=256)
    for doc in docs:
        writer.add(doc)
    paths = writer.close()
    stream = np.concatenate(docs)
    assert [p.name for p in paths] == [shard_name("train", i) for i in range(len(paths))]
    sizes = [read_header(p) for p in paths]
    assert sizes[:-1] == [256] * (len(paths) - 1) and 0 < sizes[-1] <= 256
    assert sum(sizes) == writer.total_tokens == stream.size
    assert np.array_equal(load_tokens(paths), stream)


def test_shard_writer_leaves_no_empty_shard_after_an_exact_fill(tmp_path):
    writer = ShardWriter(tmp_path, "val", shard_tokens=100)
    writer.add(np.arange(200) % 1024)
    assert [read_header(p) for p in writer.close()] == [100, 100]


def test_token_ids_must_fit_uint16(tmp_path):
    with pytest.raises(PgolfError, match="65536"):
        write_shard(tmp_path / "s.bin", np.array([1, 65536]))
    with pytest.raises(PgolfError, match="65536"):
        ShardWriter(tmp_path, "train", 10).add([-1])
    assert not (tmp_path / "s.bin").exists()


def _corrupt(tmp_path, edit) -> str:
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, _tokens(100))
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(edit(raw)))
    return str(path)


def _set_int(raw: bytearray, index: int, value: int) -> bytearray:
    raw[4 * index : 4 * index + 4] = np.array([value], dtype="<i4").tobytes()
    return raw


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: _set_int(raw, 0, SHARD_MAGIC + 1), "wrong magic"),
        (lambda raw: _set_int(raw, 1, 2), "unsupported version 2"),
        (lambda raw: raw[:500], "truncated shard"),
        (lambda raw: raw[:-2], "header says 100 tokens"),
        (lambda raw: raw + b"\0\0", "header says 100 tokens"),
        (lambda raw: _set_int(raw, 2, 101), "header says 101 tokens"),
    ],
    ids=["magic", "version", "truncated-header", "short-body", "long-body", "count"],
)
def test_every_malformed_shard_is_rejected_naming_the_file(tmp_path, edit, message):
    path = _corrupt(tmp_path, edit)
    for read in (read_header, read_shard):
        with pytest.raises(PgolfError, match=message) as info:
            read(path)
        assert str(info.value).startswith(path)


def names(paths) -> list[str]:
    return [p.name for p in paths]


def test_find_shards_resolves_dirs_globs_and_files_in_sorted_order(tmp_path):
    for name in ("fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000000.bin"):
        write_shard(tmp_path / name, np.arange(3))
    (tmp_path / "notes.bin").write_bytes(b"")  # not a shard name: ignored in a directory
    assert names(find_shards(tmp_path, split="train")) == [
        "fineweb_train_000000.bin",
        "fineweb_train_000001.bin",
    ]
    assert names(find_shards(tmp_path)) == [
        "fineweb_train_000000.bin",
        "fineweb_train_000001.bin",
        "fineweb_val_000000.bin",
    ]
    assert names(find_shards(str(tmp_path / "fineweb_v*.bin"))) == ["fineweb_val_000000.bin"]
    with pytest.raises(PgolfError, match="no shards found"):
        find_shards(str(tmp_path / "nothing_*.bin"))
    with pytest.raises(PgolfError, match="not found"):
        find_shards(tmp_path / "missing.bin")


def test_the_official_dev_shard_reads_as_200_documents():
    tokens = read_shard(DEV_SHARD)
    assert tokens.size == 628_457
    assert tokens[0] == BOS_ID
    assert int(np.count_nonzero(tokens == BOS_ID)) == 200
    assert int(tokens.max()) < 1024


def test_the_token_check_names_the_file_and_the_first_bad_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_module, "CHECK_CHUNK_TOKENS", 1000)  # the bad ids in chunk 3
    tokens = np.full(5000, 7, dtype=np.uint16)
    tokens[[2345, 2400, 4999]] = [1024, 5000, 1500]
    path = tmp_path / "fineweb_train_000003.bin"
    write_shard(path, tokens)
    assert check_token_ids(path, 5001, "the vocabulary") == 5000
    with pytest.raises(PgolfError) as exc:
        check_token_ids(path, 1024, "model.vocab_size=1024")
    assert str(exc.value) == (
        f"{path}: token id 1024 at token 2,345 (byte offset {HEADER_BYTES + 2 * 2345:,}) "
        "is not below model.vocab_size=1024"
    )
    write_shard(path, tokens[:10])
    with path.open("ab") as f:
        f.write(b"\0\0")  # a size the header does not promise
    with pytest.raises(PgolfError, match="header says 10 tokens"):
        check_token_ids(path, 1024, "model.vocab_size=1024")
