"""Documents in, official-format dataset out (SPEC §2.1–2.3); every bad input is one clear error."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pgolf.data.build import build_dataset
from pgolf.data.documents import iter_documents
from pgolf.data.shards import load_tokens, read_header, read_shard
from pgolf.data.tokenizer import BOS_ID, file_sha256, load_tokenizer
from pgolf.errors import PgolfError
from pgolf.settings import shared_data
from tests.conftest import DEV_SHARD

VERIFY_DOCS = shared_data("corpus", "fineweb_pg_verify_docs", "verify_docs.jsonl")
DEV_SHARD_SHA256 = "5d5ac9b83e9b116d32176c6d9889d3d7649e7128bbf88c2fe04b51a4110b318f"


def _jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _assert_nothing_left(parent):
    """A failed build leaves neither OUT nor a temporary directory beside it."""
    assert list(parent.iterdir()) == []


# -- the official exporter, reproduced ----------------------------------------------------------


def test_rebuilding_the_official_dev_shard_matches_it_token_for_token(
    tmp_path, official_tokenizer_path
):
    out = tmp_path / "out"
    meta = build_dataset(
        [VERIFY_DOCS], out, tokenizer=official_tokenizer_path, val_docs=0, progress=False
    )
    ours = read_shard(out / "fineweb_train_000000.bin")
    official = read_shard(DEV_SHARD)
    assert ours.size == official.size == 628_457
    assert np.array_equal(ours, official)
    assert file_sha256(out / "fineweb_train_000000.bin") == DEV_SHARD_SHA256  # header too
    assert meta["splits"]["train"] == {
        "documents": 200,
        "tokens": 628_457,
        "files": ["fineweb_train_000000.bin"],
    }
    assert meta["splits"]["val"]["documents"] == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "fineweb_train_000000.bin",
        "meta.json",
        "tokenizer.model",
    ]
    assert file_sha256(out / "tokenizer.model") == file_sha256(official_tokenizer_path)
    assert json.loads((out / "meta.json").read_text()) == {
        k: v for k, v in meta.items() if k not in ("out_dir", "seconds")
    }


def test_first_docs_go_to_val_and_the_split_streams_rejoin_to_the_official_one(
    tmp_path, official_tokenizer_path
):
    out = tmp_path / "out"
    meta = build_dataset(
        [VERIFY_DOCS],
        out,
        tokenizer=official_tokenizer_path,
        val_docs=20,
        shard_tokens=100_000,
        progress=False,
    )
    val = load_tokens(sorted(out.glob("fineweb_val_*.bin")))
    train = load_tokens(sorted(out.glob("fineweb_train_*.bin")))
    assert np.array_equal(np.concatenate([val, train]), read_shard(DEV_SHARD))
    assert int(np.count_nonzero(val == BOS_ID)) == 20 and val[0] == BOS_ID and train[0] == BOS_ID
    assert meta["splits"]["val"]["documents"] == 20
    assert meta["splits"]["train"]["documents"] == 180
    sizes = [read_header(out / name) for name in meta["splits"]["train"]["files"]]
    assert sizes[:-1] == [100_000] * (len(sizes) - 1) and sum(sizes) == train.size


def test_each_document_is_bos_then_plain_encode_with_no_eos(tmp_path, official_tokenizer_path):
    texts = ["  Leading and trailing whitespace stays for sp to normalise.  ", "", "x\x00y"]
    out = tmp_path / "out"
    build_dataset(
        [_jsonl(tmp_path / "d.jsonl", texts)],
        out,
        tokenizer=official_tokenizer_path,
        progress=False,
    )
    sp = load_tokenizer(official_tokenizer_path)
    expected = [tok for t in texts for tok in [BOS_ID, *sp.encode(t)]]  # an empty doc is [BOS]
    assert read_shard(out / "fineweb_train_000000.bin").tolist() == expected


def test_max_docs_keeps_the_first_documents(tmp_path, official_tokenizer_path):
    meta = build_dataset(
        [VERIFY_DOCS],
        tmp_path / "out",
        tokenizer=official_tokenizer_path,
        val_docs=2,
        max_docs=5,
        progress=False,
    )
    assert (meta["splits"]["val"]["documents"], meta["splits"]["train"]["documents"]) == (2, 3)
    official = read_shard(DEV_SHARD)
    fifth_doc_ends = np.flatnonzero(official == BOS_ID)[5]
    assert meta["tokens"] == fifth_doc_ends


def test_vocab_size_trains_an_official_style_tokenizer_on_the_documents(tmp_path):
    out = tmp_path / "out"
    meta = build_dataset([VERIFY_DOCS], out, vocab_size=512, val_docs=10, progress=False)
    sp = load_tokenizer(out / "tokenizer.model")
    assert sp.vocab_size() == 512 == meta["tokenizer"]["vocab_size"]
    assert meta["tokenizer"]["source"] == "trained"
    # SentencePiece skips training texts over 4,192 bytes, as it did for the official export.
    assert meta["tokenizer"]["trained_on_texts"] == 200
    assert meta["tokenizer"]["texts_within_sentencepiece_limit"] == 116
    spec = sp.serialized_model_proto()
    assert b"nmt_nfkc" in spec
    assert sum(sp.is_byte(i) for i in range(sp.vocab_size())) == 256  # byte_fallback
    first = json.loads(VERIFY_DOCS.open().readline())["text"]
    val = read_shard(out / "fineweb_val_000000.bin").tolist()
    assert val[: len(sp.encode(first)) + 1] == [BOS_ID, *sp.encode(first)]


# -- input formats --------------------------------------------------------------------------


def test_every_input_format_yields_the_same_documents(tmp_path):
    texts = ["First doc.\nSecond line.", "Zweites Dokument: ü, 😀.", "third"]
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"{i}.txt").write_text(t, encoding="utf-8")
    (tmp_path / "blank.txt").write_text("\n\n".join(texts) + "\n\n \n", encoding="utf-8")
    _jsonl(tmp_path / "d.jsonl", texts, field="body")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    table = pa.table({"id": [1, 2, 3], "body": texts})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)

    assert list(iter_documents(tmp_path / "txt")) == texts  # a directory: sorted files
    assert list(iter_documents([tmp_path / "blank.txt"], blank_line_docs=True)) == texts
    for name in ("d.jsonl", "d.jsonl.gz", "d.parquet"):
        assert list(iter_documents([tmp_path / name], text_field="body")) == texts
    assert list(iter_documents([tmp_path / "d.jsonl", tmp_path / "d.parquet"], "body")) == 2 * texts


def test_parquet_is_streamed_in_record_batches(tmp_path, monkeypatch):
    import pgolf.data.documents as documents

    monkeypatch.setattr(documents, "PARQUET_BATCH_ROWS", 7)
    texts = [f"doc {i}" for i in range(50)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet", row_group_size=16)
    assert list(iter_documents(tmp_path / "d.parquet")) == texts


# -- errors: one line naming the file, and nothing written ------------------------------------


def _build(tmp_path, inputs, official_tokenizer_path, **kwargs):
    kwargs.setdefault("tokenizer", official_tokenizer_path)
    return build_dataset(inputs, tmp_path / "outs" / "ds", progress=False, **kwargs)


def test_a_missing_input_file_is_named_and_nothing_is_created(tmp_path, official_tokenizer_path):
    good = _jsonl(tmp_path / "good.jsonl", ["a"])
    with pytest.raises(PgolfError, match=r"missing\.jsonl: input file not found"):
        _build(tmp_path, [good, tmp_path / "missing.jsonl"], official_tokenizer_path)
    assert not (tmp_path / "outs").exists()


def test_non_utf8_text_names_the_file_and_byte_offset(tmp_path, official_tokenizer_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\xff more")
    with pytest.raises(PgolfError, match=r"bad\.txt: not valid UTF-8 at byte offset 9"):
        _build(tmp_path, [bad], official_tokenizer_path)
    assert not (tmp_path / "outs").exists()
    with pytest.raises(PgolfError, match=r"bad\.txt: not valid UTF-8 in line 1 at byte offset 9"):
        list(iter_documents(bad, blank_line_docs=True))


def test_a_bad_file_after_good_ones_leaves_no_half_written_dataset(
    tmp_path, official_tokenizer_path
):
    (tmp_path / "outs").mkdir()  # line 2 starts at byte 15; the bad byte is 13 bytes into it
    bad = tmp_path / "late.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xc3"}\n')
    with pytest.raises(
        PgolfError, match=r"late\.jsonl: not valid UTF-8 in line 2 at byte offset 28"
    ):
        _build(tmp_path, [VERIFY_DOCS, bad], official_tokenizer_path, max_docs=None)
    _assert_nothing_left(tmp_path / "outs")


def test_empty_input_is_an_error_and_creates_nothing(tmp_path, official_tokenizer_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(PgolfError, match=r"empty\.jsonl: no documents found"):
        _build(tmp_path, [empty], official_tokenizer_path)
    with pytest.raises(PgolfError, match=r"empty\.jsonl: no documents found"):
        _build(tmp_path, [empty], official_tokenizer_path, tokenizer=None, vocab_size=512)
    assert not (tmp_path / "outs").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "a"}\nnot json\n', r"line 2 is not JSON"),
        (b'{"text": "a"}\n{"body": "b"}\n', r"line 2 has no 'text' field"),
        (b'{"text": 5}\n', r"line 1: field 'text' is int, expected a string"),
        (b'{"text": "\\ud800"}\n', r"line 1: field 'text' holds a lone surrogate"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, official_tokenizer_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(PgolfError, match=r"d\.jsonl: " + message):
        _build(tmp_path, [path], official_tokenizer_path)
    assert not (tmp_path / "outs").exists()


def test_parquet_without_the_column_is_named(tmp_path, official_tokenizer_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["a"]}), path)
    with pytest.raises(PgolfError, match=r"d\.parquet: no column 'text' \(columns: content\)"):
        _build(tmp_path, [path], official_tokenizer_path)


def test_unknown_extension_is_rejected_before_any_work(tmp_path, official_tokenizer_path):
    path = tmp_path / "d.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(PgolfError, match=r"d\.csv: unknown input format"):
        _build(tmp_path, [VERIFY_DOCS, path], official_tokenizer_path)


def test_exactly_one_of_tokenizer_and_vocab_size(tmp_path, official_tokenizer_path):
    docs = _jsonl(tmp_path / "d.jsonl", ["a"])
    with pytest.raises(PgolfError, match="exactly one"):
        _build(tmp_path, [docs], official_tokenizer_path, vocab_size=512)
    with pytest.raises(PgolfError, match="exactly one"):
        _build(tmp_path, [docs], official_tokenizer_path, tokenizer=None)
    with pytest.raises(PgolfError, match=r"nope\.model: tokenizer model not found"):
        _build(tmp_path, [docs], official_tokenizer_path, tokenizer=tmp_path / "nope.model")
    assert not (tmp_path / "outs").exists()


def test_a_tokenizer_too_big_for_uint16_shards_is_refused(
    tmp_path, official_tokenizer_path, monkeypatch
):
    import pgolf.data.tokenizer as tokenizer_module

    # Shrinking the limit stands in for a >65,536-piece model, which is slow to train.
    monkeypatch.setattr(tokenizer_module, "MAX_VOCAB", 512)
    docs = _jsonl(tmp_path / "d.jsonl", ["a"])
    with pytest.raises(
        PgolfError, match=r"fineweb_1024_bpe\.model: vocabulary of 1024 exceeds 512"
    ):
        _build(tmp_path, [docs], official_tokenizer_path)
    assert not (tmp_path / "outs").exists()


def test_val_docs_must_leave_training_documents(tmp_path, official_tokenizer_path):
    docs = _jsonl(tmp_path / "d.jsonl", ["a", "b"])
    with pytest.raises(PgolfError, match="val_docs=2 leaves no training documents"):
        _build(tmp_path, [docs], official_tokenizer_path, val_docs=2)
    assert not (tmp_path / "outs").exists()  # the parent this call created is removed too


def test_an_existing_dataset_is_kept_unless_overwrite(tmp_path, official_tokenizer_path):
    out = tmp_path / "out"
    first = _jsonl(tmp_path / "a.jsonl", ["first dataset"])
    second = _jsonl(tmp_path / "b.jsonl", ["second", "dataset"])
    build_dataset([first], out, tokenizer=official_tokenizer_path, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(PgolfError, match=r"out: directory is not empty"):
        build_dataset([second], out, tokenizer=official_tokenizer_path, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    meta = build_dataset(
        [second], out, tokenizer=official_tokenizer_path, progress=False, overwrite=True
    )
    assert meta["documents"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "out"]


def test_an_empty_existing_directory_is_filled(tmp_path, official_tokenizer_path):
    out = tmp_path / "out"
    out.mkdir()
    build_dataset(
        [_jsonl(tmp_path / "a.jsonl", ["x"])],
        out,
        tokenizer=official_tokenizer_path,
        progress=False,
    )
    assert (out / "meta.json").is_file()
