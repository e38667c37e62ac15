"""`inspect_path`: tokens, documents, scored targets and their official byte count (SPEC §3)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pgolf.data.inspect as inspect_module
from pgolf.data.build import build_dataset
from pgolf.data.inspect import format_inspect, inspect_path
from pgolf.data.shards import read_shard, write_shard
from pgolf.data.tokenizer import BOS_ID, SPACE_MARK, build_byte_tables, load_tokenizer
from pgolf.errors import PgolfError
from pgolf.eval.bpb import target_bytes
from pgolf.settings import shared_data
from tests.conftest import DEV_SHARD

VERIFY_DOCS = shared_data("corpus", "fineweb_pg_verify_docs", "verify_docs.jsonl")


def test_official_byte_count_equals_the_bytes_of_the_decoded_documents(official_tokenizer_path):
    """Why the two counts are equal exactly, not approximately:

    The stream is BOS d1 BOS d2 ... BOS d200. Targets are every token but the first (a BOS).
    - BOS targets (documents 2..200) cost 0 bytes, and decoding a document ignores its BOS.
    - A document's first piece follows a BOS, a boundary, so its leading ▁ (if any) is not
      counted; sp.decode likewise drops a leading ▁ of the first piece. (With add_dummy_prefix
      off and whitespace stripped by normalisation, no first piece here has one anyway.)
    - Every later piece is counted as its UTF-8 bytes, plus 1 for a leading ▁ (after a
      non-boundary piece), which is exactly how sp.decode turns ▁ back into a space.
    - A <0xNN> piece is 1 byte, and the decoded bytes of a run of them are those bytes: the
      runs come from encoding valid UTF-8, so decoding them yields no U+FFFD replacement.
    So Σ_docs len(utf8(sp.decode(doc))) = the official count; both are the bytes of the
    SentencePiece-normalised text (NFKC, whitespace collapsed), not of the raw FineWeb text.
    """
    result = inspect_path(DEV_SHARD, tokenizer=official_tokenizer_path)
    stats = result["splits"]["shards"]
    sp = load_tokenizer(official_tokenizer_path)
    tokens = np.asarray(read_shard(DEV_SHARD)).astype(np.int64)
    docs = np.split(tokens, np.flatnonzero(tokens == BOS_ID)[1:])
    assert all(d[0] == BOS_ID for d in docs) and len(docs) == 200
    decoded = [sp.decode(d[1:].tolist()) for d in docs]
    assert not any("\ufffd" in text for text in decoded)
    assert not any(sp.id_to_piece(int(d[1])).startswith(SPACE_MARK) for d in docs)
    decoded_bytes = sum(len(text.encode("utf-8")) for text in decoded)

    assert stats["tokens"] == 628_457 and stats["documents"] == 200
    assert stats["targets"] == 628_456  # every token after the stream's first
    assert stats["target_bytes"] == decoded_bytes == 1_489_418
    assert stats["bytes_per_target"] == pytest.approx(1_489_418 / 628_456)

    # The same bytes are the normalised source text, and fewer than the raw text's 1,489,515.
    texts = [json.loads(line)["text"] for line in VERIFY_DOCS.open(encoding="utf-8")]
    normalised = sum(len(sp.normalize(t).replace(SPACE_MARK, " ").encode()) for t in texts)
    raw = sum(len(t.encode("utf-8")) for t in texts)
    assert normalised == decoded_bytes and raw == 1_489_515


def test_a_dataset_dir_reports_splits_separately_with_its_own_tokenizer(
    tmp_path, official_tokenizer_path
):
    out = tmp_path / "ds"
    build_dataset(
        [VERIFY_DOCS],
        out,
        tokenizer=official_tokenizer_path,
        val_docs=30,
        shard_tokens=150_000,
        progress=False,
    )
    result = inspect_path(out)  # no tokenizer given: DIR/tokenizer.model is used
    assert result["kind"] == "dataset"
    assert result["tokenizer"]["path"] == str(out / "tokenizer.model")
    assert result["tokenizer"]["vocab_size"] == 1024
    tables = build_byte_tables(load_tokenizer(official_tokenizer_path))
    for split, docs in (("train", 170), ("val", 30)):
        stats = result["splits"][split]
        stream = np.concatenate([read_shard(f["path"]) for f in stats["files"]]).astype(np.int64)
        assert stats["documents"] == docs
        assert stats["tokens"] == stream.size and stats["targets"] == stream.size - 1
        assert stats["target_bytes"] == int(target_bytes(stream[:-1], stream[1:], tables).sum())
    assert len(result["splits"]["train"]["files"]) > 1
    text = format_inspect(result)
    assert "train" in text and "val" in text and f"{result['splits']['val']['tokens']:,}" in text


def test_chunked_counting_matches_one_pass_across_shards(
    tmp_path, official_tokenizer_path, monkeypatch
):
    tokens = np.asarray(read_shard(DEV_SHARD))
    cuts = [0, 1, 70_000, 70_001, 300_000, tokens.size]
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", tokens[a:b])  # incl. a 1-token shard
    whole = inspect_path(DEV_SHARD, tokenizer=official_tokenizer_path)["splits"]["shards"]
    monkeypatch.setattr(inspect_module, "CHUNK_TOKENS", 4097)
    pieces = inspect_path(str(tmp_path / "*.bin"), tokenizer=official_tokenizer_path)
    stats = pieces["splits"]["shards"]
    assert len(stats["files"]) == 5
    for key in ("tokens", "documents", "targets", "target_bytes"):
        assert stats[key] == whole[key]


def test_without_a_tokenizer_only_counts_are_reported():
    result = inspect_path(DEV_SHARD)
    stats = result["splits"]["shards"]
    assert result["tokenizer"] is None
    assert (stats["tokens"], stats["documents"], stats["max_token_id"]) == (628_457, 200, 1023)
    assert "targets" not in stats
    assert "tokenizer: none given" in format_inspect(result)


def test_ids_beyond_the_tokenizer_vocab_are_an_error_naming_the_shard(
    tmp_path, official_tokenizer_path
):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.array([BOS_ID, 5, 2000, 7]))  # e.g. sp4096 shards with the sp1024 model
    with pytest.raises(PgolfError, match=r"fineweb_train_000000\.bin: token id 2000 does not fit"):
        inspect_path(path, tokenizer=official_tokenizer_path)
    assert inspect_path(path)["splits"]["shards"]["max_token_id"] == 2000


def test_missing_paths_are_errors(tmp_path):
    with pytest.raises(PgolfError, match=r"nothing\.bin: shard file not found"):
        inspect_path(tmp_path / "nothing.bin")
    with pytest.raises(PgolfError, match="no shards found"):
        inspect_path(tmp_path)
