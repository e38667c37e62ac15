"""CaseOps data (SPEC §2.3, §3.4, §5.31): the record's lossless case transform, its byte sidecar,
and BPB counted on the original text's bytes.

Parity is with the record's own files in `$PGOLF_SHARED/reference/`, imported here, never copied.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch

from pgolf.cli import main
from pgolf.config import RunConfig
from pgolf.data.build import build_dataset
from pgolf.data.caseops import (
    decode_case,
    encode_case,
    encode_documents,
    load_byte_sidecar,
    original_byte_counts,
)
from pgolf.data.dataset import resolve_dataset
from pgolf.data.inspect import inspect_path
from pgolf.data.shards import find_shards, read_shard, write_shard
from pgolf.data.tokenizer import BOS_ID, build_byte_tables, file_sha256, load_tokenizer
from pgolf.dist import World
from pgolf.errors import PgolfError
from pgolf.eval.bpb import TorchByteTables
from pgolf.eval.config import EvalConfig
from pgolf.eval.data import EvalData
from pgolf.eval.evaluate import evaluate
from pgolf.eval.score import score_nonoverlapping
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT
from pgolf.settings import shared_data, shared_dir

VERIFY_DOCS = shared_data("corpus", "fineweb_pg_verify_docs", "verify_docs.jsonl")
LEGAL_PILOT = sorted(shared_data("corpus", "fineweb_legal_pilot", "derived").glob("*.jsonl.gz"))
CASEOPS_TOKENIZER = shared_data(
    "tokenizers", "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
)
CPU_WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _import_reference(name: str, filename: str):
    spec = importlib.util.spec_from_file_location(name, shared_dir() / "reference" / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1)
def record_caps():
    """The record's `lossless_caps.py`, shipped in the shared folder as top_lossless_caps.py."""
    return _import_reference("top_lossless_caps", "top_lossless_caps.py")


@functools.lru_cache(maxsize=1)
def verify_docs() -> list[str]:
    return [json.loads(line)["text"] for line in VERIFY_DOCS.read_text("utf-8").splitlines()]


def legal_pilot_docs() -> list[str]:
    docs = []
    for path in LEGAL_PILOT:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            docs += [json.loads(line)["text"] for line in f]
    return docs


@functools.lru_cache(maxsize=1)
def caseops_sp() -> spm.SentencePieceProcessor:
    return load_tokenizer(CASEOPS_TOKENIZER)


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _utf8_bytes(texts) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


# -- the transform ---------------------------------------------------------------------------


def test_the_case_transform_is_the_records_on_every_official_verify_document():
    record = record_caps()
    for doc in verify_docs():
        encoded = encode_case(doc)
        assert encoded == record.encode_lossless_caps_v2(doc)
        assert decode_case(encoded) == doc


@pytest.mark.parametrize(
    "text",
    [
        "The NASA Launch",  # title, all capitals
        "McDonald iPhone ABc aBC abcD",  # capitals inside words: CAPNEXT
        "A I a x AB",  # single capitals are TITLE; two capitals are ALLCAPS
        "ABC123DEF G7h",  # digits end a word
        "Élan ÀB déjà",  # non-ASCII letters stay as they are and end ASCII words
        "lit\ue001eral \ue004\ue004 \ue002AB\ue003",  # operators in the text are escaped
        "",
    ],
)
def test_the_case_transform_matches_the_record_on_words_of_every_shape(text):
    encoded = encode_case(text)
    assert encoded == record_caps().encode_lossless_caps_v2(text)
    assert decode_case(encoded) == record_caps().decode_lossless_caps_v2(encoded) == text


def test_the_case_transform_inverts_exactly_on_every_shared_fineweb_document():
    docs = verify_docs() + legal_pilot_docs()
    assert len(docs) == 200 + 2_800
    changed = 0
    for doc in docs:
        encoded = encode_case(doc)
        assert decode_case(encoded) == doc
        changed += encoded != doc
    assert changed > 2_900  # almost every document has a capital: the round trip is no no-op


@pytest.mark.parametrize("text", ["\ue001", "\ue0011", "ab\ue001c", "\ue002A", "\ue004", "\ue001A"])
def test_decoding_refuses_what_the_transform_never_produces(text):
    with pytest.raises(PgolfError, match="not a CaseOps-encoded string"):
        decode_case(text)


# -- the byte sidecar ------------------------------------------------------------------------


def test_per_token_byte_counts_are_the_records_surface_accounting():
    pytest.importorskip("google.protobuf", reason="the record's path reads SentencePiece protos")
    sp, record = caseops_sp(), record_caps()
    docs = verify_docs()[:30]
    ids, counts = encode_documents(sp, docs, with_bytes=True)
    for doc, doc_ids, doc_counts in zip(docs, ids, counts, strict=True):
        proto = sp.encode_as_proto(record.encode_lossless_caps_v2(doc))
        assert doc_ids == [p.id for p in proto.pieces]
        assert doc_counts == record.surface_piece_original_byte_counts(
            (p.surface for p in proto.pieces), text_transform_name=record.LOSSLESS_CAPS_CASEOPS_V1
        )
        assert sum(doc_counts) == len(doc.encode("utf-8"))
    plain_ids, none = encode_documents(sp, docs, with_bytes=False)
    assert plain_ids == ids and none is None


def test_operators_stand_for_no_bytes_and_escaped_literals_for_their_own():
    # Surfaces as SentencePiece may cut them: an ESC may end one piece, its literal begin the next.
    surfaces = ["\ue001the", " \ue002nasa", "\ue004", "\ue001x", "é\ue003", "b"]
    assert original_byte_counts(s.encode() for s in surfaces) == [3, 5, 0, 4, 2, 1]
    record = record_caps()
    assert record.surface_piece_original_byte_counts(
        surfaces, text_transform_name=record.LOSSLESS_CAPS_CASEOPS_V1
    ) == [3, 5, 0, 4, 2, 1]


def test_caseops_build_is_the_records_prepare_script_byte_for_byte(tmp_path, monkeypatch):
    pytest.importorskip("google.protobuf", reason="the record's script reads SentencePiece protos")
    docs = _jsonl(tmp_path / "docs.jsonl", verify_docs()[:40])
    # The record's script imports its helper as `lossless_caps` and calls SentencePiece's older
    # `encode_as_immutable_proto`, which sentencepiece ≥ 0.2.1 offers as `encode_as_proto`.
    monkeypatch.setitem(sys.modules, "lossless_caps", record_caps())
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(
        spm.SentencePieceProcessor,
        "encode_as_immutable_proto",
        lambda self, text: self.encode_as_proto(text),
        raising=False,
    )
    prepare = _import_reference("top_prepare_caseops_data", "top_prepare_caseops_data.py")
    argv = ["prep", "--docs", str(docs), "--out", str(tmp_path / "record")]
    monkeypatch.setattr(sys, "argv", [*argv, "--sp", str(CASEOPS_TOKENIZER), "--val-docs", "15"])
    prepare.main()
    record = (
        tmp_path / "record" / "datasets" / "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    )

    ours = tmp_path / "ours"
    build_dataset(
        [docs], ours, tokenizer=CASEOPS_TOKENIZER, val_docs=15, caseops=True, progress=False
    )
    names = ["fineweb_train_000000.bin", "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"]
    assert sorted(p.name for p in record.iterdir()) == names
    for name in names:
        assert file_sha256(ours / name) == file_sha256(record / name), name


def test_the_sidecar_totals_the_utf8_bytes_of_the_original_val_documents(tmp_path):
    val = verify_docs()[:50]
    out = tmp_path / "out"
    meta = build_dataset(
        [VERIFY_DOCS],
        out,
        tokenizer=CASEOPS_TOKENIZER,
        val_docs=50,
        max_docs=52,
        shard_tokens=50_000,  # several val shards: each sidecar pairs with its own
        caseops=True,
        progress=False,
    )
    files = [out / name for name in meta["splits"]["val"]["files"]]
    assert len(files) == 3
    tokens = np.concatenate([np.asarray(read_shard(p)) for p in files])
    counts = load_byte_sidecar(files)
    assert counts.shape == tokens.shape
    # BOS starts each document and stands for no bytes; every other byte is some token's.
    assert (tokens == BOS_ID).sum() == 50 and not counts[tokens == BOS_ID].any()
    assert int(counts.sum()) == _utf8_bytes(val) == meta["caseops"]["val_original_bytes"]
    assert meta["caseops"]["transform"] == "lossless_caps_caseops_v1"
    assert meta["caseops"]["byte_sidecar"] == [f"fineweb_val_bytes_{i:06d}.bin" for i in range(3)]
    # A dataset without sidecars counts bytes with the tokenizer's tables, as before.
    assert inspect_path(out)["splits"]["val"]["target_bytes"] == _utf8_bytes(val)
    plain = tmp_path / "plain"
    build_dataset([VERIFY_DOCS], plain, tokenizer=CASEOPS_TOKENIZER, val_docs=5, progress=False)
    assert load_byte_sidecar(find_shards(plain, "val")) is None


def test_whitespace_at_a_documents_ends_is_in_no_token_and_counted_by_neither(tmp_path):
    # SentencePiece strips it before any piece (and so does the record); runs inside count whole.
    docs = ["  Hello,   World!\n\n", "\tTab  Inside \u00bd\ufb01 "]
    out = tmp_path / "out"
    build_dataset(
        [_jsonl(tmp_path / "d.jsonl", [*docs, "train"])],
        out,
        tokenizer=CASEOPS_TOKENIZER,
        val_docs=2,
        caseops=True,
        progress=False,
    )
    counts = load_byte_sidecar([out / "fineweb_val_000000.bin"])
    assert int(counts.sum()) == _utf8_bytes(d.strip() for d in docs)


def test_a_caseops_val_shard_without_its_own_sidecar_is_refused(tmp_path):
    out = tmp_path / "out"
    _jsonl(tmp_path / "d.jsonl", ["One Doc.", "Two Docs.", "Three."])
    build_dataset(
        [tmp_path / "d.jsonl"], out, tokenizer=CASEOPS_TOKENIZER, val_docs=2, caseops=True,
        progress=False,
    )  # fmt: skip
    val = [out / "fineweb_val_000000.bin"]
    sidecar = out / "fineweb_val_bytes_000000.bin"
    # A `fineweb_val_*.bin` glob matches the sidecar too; it is no token shard.
    assert find_shards(str(out / "fineweb_val_*.bin")) == val
    counts = np.asarray(read_shard(sidecar)).copy()
    write_shard(sidecar, counts[:-1])
    with pytest.raises(PgolfError, match="fineweb_val_bytes_000000.bin: .* expected one per token"):
        load_byte_sidecar(val)
    sidecar.unlink()
    with pytest.raises(PgolfError, match="fineweb_val_bytes_000000.bin: CaseOps byte sidecar"):
        load_byte_sidecar(val)  # meta.json records CaseOps: the tables must not stand in


def test_data_build_caseops_on_the_command_line(tmp_path, capsys):
    docs = str(_jsonl(tmp_path / "d.jsonl", ["First Doc.", "Second DOC here."]))
    args = ["data", "build", "--input", docs, "--out", str(tmp_path / "out"), "--val-docs", "1"]
    assert main([*args, "--tokenizer", str(CASEOPS_TOKENIZER), "--caseops", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["caseops"]["val_original_bytes"] == len("First Doc.")
    assert (tmp_path / "out" / "fineweb_val_bytes_000000.bin").is_file()
    sp1024 = str(shared_data("tokenizers", "fineweb_1024_bpe.model"))
    assert main([*args[:-2], "--out", str(tmp_path / "x"), "--tokenizer", sp1024, "--caseops"]) == 2
    assert "not a CaseOps tokenizer" in capsys.readouterr().err
    assert main([*args[:-2], "--out", str(tmp_path / "y"), "--vocab-size", "300", "--caseops"]) == 2
    assert "--caseops needs --tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# -- BPB on the original bytes ---------------------------------------------------------------


def test_bpb_on_caseops_shards_counts_the_original_bytes_from_the_sidecar(tmp_path):
    # The three shortest verify documents keep the 8192-way softmax cheap.
    val = sorted(verify_docs(), key=len)[:3]
    out = tmp_path / "out"
    docs = _jsonl(tmp_path / "d.jsonl", [*val, verify_docs()[0]])
    build_dataset(
        [docs], out, tokenizer=CASEOPS_TOKENIZER, val_docs=3, caseops=True, progress=False
    )
    cfg = RunConfig()
    cfg.data.path = str(out)
    cfg.model = ModelConfig(
        vocab_size=8192, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1
    )
    cfg.train.train_seq_len = 256
    data = EvalData(cfg, resolve_dataset(cfg.data), torch.device("cpu"))
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    settings = EvalConfig(eval_mode="sliding", eval_seq_len=256, eval_stride=256)
    result = evaluate(model, data.tokens, data.byte_tables, settings, CPU_WORLD, train_seq_len=256)
    # Every target is scored once: the denominator is the val documents' original UTF-8 bytes.
    assert result["val_tokens"] == len(data.tokens) - 1
    assert result["val_bytes"] == _utf8_bytes(val)
    assert result["val_bpb"] == pytest.approx(result["val_nats"] / (np.log(2) * _utf8_bytes(val)))
    # The tokenizer's tables would count each case operator as its 3 UTF-8 bytes, and normalised
    # rather than original whitespace: a different, larger denominator.
    tables = TorchByteTables(build_byte_tables(caseops_sp(), 8192))
    by_tables = evaluate(model, data.tokens, tables, settings, CPU_WORLD, train_seq_len=256)
    assert by_tables["val_nats"] == pytest.approx(result["val_nats"], rel=1e-12)
    assert by_tables["val_bytes"] > _utf8_bytes(val) == result["val_bytes"]
    # The in-training check (non-overlapping, tail trimmed) reads the same sidecar.
    sums = score_nonoverlapping(model, data.tokens, 256, 8 * 256, data.byte_tables, CPU_WORLD)
    scored = (len(data.tokens) - 1) // 256 * 256
    counts = load_byte_sidecar(find_shards(out, "val"))
    assert sums.tokens == scored and sums.bytes == int(counts[1 : scored + 1].sum())
