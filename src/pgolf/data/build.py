"""Turn raw text documents into an official-format dataset directory (SPEC §2.1–2.3).

OUT/ gets `fineweb_val_*.bin` (the first `val_docs` documents), `fineweb_train_*.bin` (the rest,
in order), `tokenizer.model` and `meta.json`. Each document is written as `[BOS] + sp.encode(text)`
with no EOS, exactly as the official exporter does; the exporter encodes the raw text (its NUL→space
and strip clean-up applies only to tokenizer training), so we do too, and that reproduces the
official dev shard token for token. With `caseops` every text goes through the TOP record's case
transform first and each val shard gets its byte sidecar (`pgolf.data.caseops`).

The whole directory is built beside OUT and renamed into place at the end, so OUT is either the
complete old dataset, the complete new one, or absent; never half written.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from pgolf import __version__
from pgolf.data.caseops import TRANSFORM, check_counts_fit, check_tokenizer, encode_documents
from pgolf.data.documents import iter_sourced_documents, resolve_inputs
from pgolf.data.shards import BYTE_SIDECAR, DEFAULT_SHARD_TOKENS, ShardWriter
from pgolf.data.tokenizer import (
    BOS_ID,
    clean_for_training,
    file_sha256,
    load_tokenizer,
    train_tokenizer,
)
from pgolf.errors import PgolfError
from pgolf.fileio import remove_empty_dirs, writable_dir, write_text_atomic
from pgolf.progress import progress_bar

TOKENIZER_FILE = "tokenizer.model"
META_FILE = "meta.json"
META_FORMAT = "pgolf.dataset/1"
# Documents per sp.encode call: big enough that SentencePiece's own threads stay busy.
ENCODE_BATCH_DOCS = 1024
# SentencePiece silently skips training sentences longer than this (its max_sentence_length
# default, which the official exporter keeps), so long documents never shape the vocabulary.
SP_MAX_SENTENCE_BYTES = 4192
# The trained model depends on SentencePiece's thread count (measured: 1, 2 and 16 threads give
# three different models from the same text), so it is pinned and recorded.
TOKENIZER_TRAIN_THREADS = 2

DocumentSource = Callable[[], Iterable[tuple[str, str]]]


def build_dataset(
    inputs,
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    vocab_size: int | None = None,
    val_docs: int = 0,
    max_docs: int | None = None,
    text_field: str = "text",
    blank_line_docs: bool = False,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
    overwrite: bool = False,
    caseops: bool = False,
) -> dict:
    """Build OUT from text files with an existing tokenizer, or one trained on the documents.

    With `vocab_size`, the tokenizer is trained with the official settings on all documents in
    order (validation ones included, as the official exporter does by default). Returns the
    content of OUT/meta.json plus `out_dir` and `seconds`.
    """
    if max_docs is not None and max_docs <= 0:
        raise PgolfError(f"max_docs must be a positive number of documents, got {max_docs}")
    files = resolve_inputs(inputs)

    def documents() -> Iterator[tuple[str, str]]:
        docs = (
            (str(path), text)
            for path, text in iter_sourced_documents(files, text_field, blank_line_docs)
        )
        return itertools.islice(docs, max_docs)

    def sources() -> list[dict]:
        return [
            {"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files
        ]

    settings = {
        "val_docs": val_docs,
        "max_docs": max_docs,
        "text_field": text_field,
        "blank_line_docs": blank_line_docs,
        "shard_tokens": shard_tokens,
    }
    return write_dataset(
        documents,
        out_dir,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        val_docs=val_docs,
        shard_tokens=shard_tokens,
        progress=progress,
        overwrite=overwrite,
        sources=sources,
        settings=settings,
        label=", ".join(str(p) for p in files),
        caseops=caseops,
    )


def write_dataset(
    documents: DocumentSource,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    vocab_size: int | None = None,
    val_docs: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
    overwrite: bool = False,
    sources: list | Callable[[], list] | None = None,
    settings: dict | None = None,
    tokenizer_texts: Callable[[], Iterable[str]] | None = None,
    tokenizer_note: str | None = None,
    tokenizer_threads: int = TOKENIZER_TRAIN_THREADS,
    label: str = "input",
    caseops: bool = False,
) -> dict:
    """The engine behind `build_dataset` and the demo: documents in, dataset directory out.

    `documents()` yields `(source, text)` pairs and may be called twice (tokenizer training, then
    encoding). `tokenizer_texts()` overrides what a new tokenizer is trained on (default: the
    documents' texts); `tokenizer_note` describes that choice in meta.json. `sources` (or a
    function returning them, called only once the build has succeeded) describes the inputs;
    `label` names them in error messages. `caseops` writes the record's CaseOps form (an
    existing tokenizer that reserves the operators is required).
    """
    start = time.perf_counter()
    if (tokenizer is None) == (vocab_size is None):
        raise PgolfError("give exactly one of a tokenizer model or a vocab size to train one")
    if val_docs < 0:
        raise PgolfError(f"val_docs must be ≥ 0, got {val_docs}")
    if shard_tokens <= 0:
        raise PgolfError(f"shard size must be a positive number of tokens, got {shard_tokens}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    if caseops and tokenizer is None:
        raise PgolfError("--caseops needs --tokenizer: the record's CaseOps SP8192 model")
    if tokenizer is not None:
        sp = load_tokenizer(tokenizer)  # a bad model fails now, before anything is created
        if caseops:
            check_tokenizer(sp, tokenizer)
    first = next(iter(documents()), None)
    if first is None:
        raise PgolfError(f"{label}: no documents found; expected at least one")

    created = writable_dir(out_dir.parent, "--out")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        tok_path = tmp / TOKENIZER_FILE
        if vocab_size is not None:
            texts = tokenizer_texts or (lambda: (text for _, text in documents()))
            tok_meta = _train(texts, vocab_size, tok_path, tokenizer_threads)
            tok_meta["source"] = "trained"
        else:
            shutil.copyfile(tokenizer, tok_path)
            tok_meta = {"source": str(tokenizer)}
        if tokenizer_note:
            tok_meta["note"] = tokenizer_note
        sp = load_tokenizer(tok_path)
        splits = _write_shards(sp, documents, tmp, val_docs, shard_tokens, progress, caseops)
        caseops_meta = splits.pop("caseops", False)
        meta = {
            "format": META_FORMAT,
            "pgolf_version": __version__,
            "tokenizer": {
                "file": TOKENIZER_FILE,
                "sha256": file_sha256(tok_path),
                "vocab_size": int(sp.vocab_size()),
                **tok_meta,
            },
            "documents": splits["train"]["documents"] + splits["val"]["documents"],
            "tokens": splits["train"]["tokens"] + splits["val"]["tokens"],
            "caseops": caseops_meta,
            "splits": splits,
            "sources": (sources() if callable(sources) else sources) or [],
            "settings": {**(settings or {}), "bos_id": BOS_ID, "append_eos": False},
        }
        write_text_atomic(tmp / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty_dirs(created)  # only directories this call made
        raise
    return {**meta, "out_dir": str(out_dir.resolve()), "seconds": time.perf_counter() - start}


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise PgolfError(f"{out_dir}: exists and is not a directory; expected a dataset directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise PgolfError(f"{out_dir}: directory is not empty; choose a new one or overwrite it")


def _install(tmp: Path, out_dir: Path) -> None:
    """Swap the finished build into place; the old OUT (if any) is deleted only afterwards."""
    _apply_umask(tmp)
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:  # put the previous dataset back rather than lose it
            os.replace(old / out_dir.name, out_dir)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _apply_umask(tmp: Path) -> None:
    # mkdtemp/mkstemp create private (0700/0600) entries; a dataset should get the usual
    # permissions, so that other users and containers can read it.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for path in tmp.iterdir():
        path.chmod(0o666 & ~umask)


def _train(texts: Callable[[], Iterable[str]], vocab_size: int, path: Path, threads: int) -> dict:
    counts = {"documents": 0, "used": 0}

    def counted() -> Iterator[str]:
        for text in texts():
            counts["documents"] += 1
            cleaned = clean_for_training(text)
            if cleaned and len(cleaned.encode("utf-8")) <= SP_MAX_SENTENCE_BYTES:
                counts["used"] += 1
            yield text

    try:
        train_tokenizer(counted(), vocab_size, path, num_threads=threads)
    except PgolfError:
        if counts["used"] == 0:  # say why, rather than SentencePiece's "!sentences_.empty()"
            raise PgolfError(
                f"tokenizer training: none of the {counts['documents']} texts is non-empty and at "
                f"most {SP_MAX_SENTENCE_BYTES} UTF-8 bytes, the longest SentencePiece trains on"
            ) from None
        raise
    return {
        "trained_on_texts": counts["documents"],
        "texts_within_sentencepiece_limit": counts["used"],
        "sentencepiece_max_sentence_bytes": SP_MAX_SENTENCE_BYTES,
        "train_threads": threads,
    }


def _write_shards(
    sp,
    documents: DocumentSource,
    out: Path,
    val_docs: int,
    shard_tokens: int,
    progress: bool,
    caseops: bool = False,
) -> dict:
    writers = {
        "val": ShardWriter(out, "val", shard_tokens),
        "train": ShardWriter(out, "train", shard_tokens),
    }
    if caseops:  # split at the val writer's token counts, so sidecar i pairs with val shard i
        writers[BYTE_SIDECAR] = ShardWriter(out, BYTE_SIDECAR, shard_tokens)
    doc_counts = {"val": 0, "train": 0}
    original_bytes = 0
    bar = progress_bar(desc="tokenizing", enabled=progress, unit=" docs")
    with bar:
        for batch in _batches(documents(), ENCODE_BATCH_DOCS):
            # Validation documents come first, so a batch splits at most once, at `cut`.
            seen = doc_counts["val"] + doc_counts["train"]
            cut = min(max(val_docs - seen, 0), len(batch))
            for split, part in (("val", batch[:cut]), ("train", batch[cut:])):
                if not part:
                    continue
                texts = [text for _, text in part]
                try:
                    if caseops:
                        encoded, counts = encode_documents(sp, texts, split == "val")
                    else:
                        encoded, counts = sp.encode(texts, out_type=int), None
                except (RuntimeError, UnicodeError) as exc:
                    raise PgolfError(
                        f"{part[0][0]}: could not tokenize a document ({exc})"
                    ) from None
                writers[split].add(_with_bos(encoded))
                if counts is not None:
                    check_counts_fit(counts, part[0][0])
                    writers[BYTE_SIDECAR].add(_with_bos(counts, first=0))  # BOS: no bytes
                    original_bytes += sum(map(sum, counts))
                doc_counts[split] += len(part)
            bar.update(len(batch))
    total = doc_counts["val"] + doc_counts["train"]
    if total < val_docs or doc_counts["train"] == 0:
        raise PgolfError(
            f"val_docs={val_docs} leaves no training documents: the inputs hold {total} documents"
        )
    result = {}
    for split in ("train", "val"):
        paths = writers[split].close() if doc_counts[split] else []
        result[split] = {
            "documents": doc_counts[split],
            "tokens": writers[split].total_tokens,
            "files": [p.name for p in paths],
        }
    if caseops:
        paths = writers[BYTE_SIDECAR].close() if doc_counts["val"] else []
        result["caseops"] = {
            "transform": TRANSFORM,
            "byte_sidecar": [p.name for p in paths],
            "val_original_bytes": original_bytes,
        }
    return result


def _with_bos(encoded: list[list[int]], first: int = BOS_ID) -> np.ndarray:
    """Concatenate documents as `[BOS] + ids` each (no EOS, SPEC §2.1); `first` replaces BOS."""
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(
        itertools.chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum())
    )
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return np.insert(flat, starts, first)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch
