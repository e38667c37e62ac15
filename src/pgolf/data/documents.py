"""Read raw text documents from .txt, .jsonl, .jsonl.gz and .parquet files, in order.

Every dataset pgolf builds starts here, so every way a file can be unusable (missing, unknown
format, bytes that are not UTF-8, a line that is not JSON, a missing field or column) becomes a
PgolfError that names the file and the place in it, before any shard is written for it.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from pgolf.errors import PgolfError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
# Rows per Arrow record batch: bounds memory on multi-GB parquet files.
PARQUET_BATCH_ROWS = 4096


def document_format(path: str | os.PathLike) -> str:
    """The format of an input file from its name: one of SUFFIXES, else PgolfError."""
    name = Path(path).name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):  # ".jsonl.gz" before ".gz"-less ones
        if name.endswith(suffix):
            return suffix
    raise PgolfError(f"{path}: unknown input format (expected one of {', '.join(SUFFIXES)})")


def resolve_inputs(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """Expand files, directories (their supported files, sorted) and globs; check each exists.

    Checked up front so a typo in the last input fails before hours of tokenizing the first.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    resolved: list[Path] = []
    for entry in paths:
        text = str(entry)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and _supported(p))
            if not found:
                raise PgolfError(f"{path}: directory has no {', '.join(SUFFIXES)} files")
            resolved.extend(found)
        elif not path.exists() and any(ch in text for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
            if not found:
                raise PgolfError(f"{text}: no files match this pattern")
            resolved.extend(found)
        elif path.is_file():
            resolved.append(path)
        else:
            raise PgolfError(f"{path}: input file not found")
    for path in resolved:
        document_format(path)
    return resolved


def iter_documents(
    paths: Iterable[str | os.PathLike] | str | os.PathLike,
    text_field: str = "text",
    blank_line_docs: bool = False,
) -> Iterator[str]:
    """Yield the documents of every input in order.

    `.txt`: the whole file is one document, or with `blank_line_docs` each run of non-blank lines
    is one. `.jsonl`/`.jsonl.gz`: one JSON object per line, text in `text_field` (blank lines are
    skipped). `.parquet`: the `text_field` column, streamed in record batches.
    """
    for _, text in iter_sourced_documents(paths, text_field, blank_line_docs):
        yield text


def iter_sourced_documents(
    paths: Iterable[str | os.PathLike] | str | os.PathLike,
    text_field: str = "text",
    blank_line_docs: bool = False,
) -> Iterator[tuple[Path, str]]:
    """Like `iter_documents`, but yield `(file, text)` so later errors can name the file."""
    for path in resolve_inputs(paths):
        fmt = document_format(path)
        if fmt == ".txt":
            docs = _iter_txt_blocks(path) if blank_line_docs else _iter_txt_whole(path)
        elif fmt == ".parquet":
            docs = _iter_parquet(path, text_field)
        else:
            docs = _iter_jsonl(path, text_field)
        for text in docs:
            yield path, text


def _supported(path: Path) -> bool:
    try:
        document_format(path)
    except PgolfError:
        return False
    return True


def _decode(data: bytes, path: Path, where: str = "", base_offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = base_offset + exc.start
        raise PgolfError(
            f"{path}: not valid UTF-8 {where}at byte offset {offset} "
            f"(byte 0x{data[exc.start]:02x}); expected UTF-8 text"
        ) from None


def _iter_txt_whole(path: Path) -> Iterator[str]:
    yield _decode(path.read_bytes(), path)


def _iter_txt_blocks(path: Path) -> Iterator[str]:
    # Streamed line by line so a multi-GB text file never sits in memory at once.
    block: list[str] = []
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = _decode(raw, path, f"in line {number} ", offset)
            offset += len(raw)
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).rstrip("\r\n")
                block = []
    if block:
        yield "".join(block).rstrip("\r\n")


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    offset = 0
    number = 0
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                line = _decode(raw, path, f"in line {number} ", offset)
                offset += len(raw)
                if not line.strip():
                    continue
                yield _jsonl_text(line, path, number, text_field)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise PgolfError(f"{path}: corrupt gzip data after line {number} ({exc})") from None


def _jsonl_text(line: str, path: Path, number: int, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PgolfError(
            f"{path}: line {number} is not JSON ({exc.msg}); expected one JSON object per line"
        ) from None
    if not isinstance(record, dict) or text_field not in record:
        raise PgolfError(f"{path}: line {number} has no {text_field!r} field")
    text = record[text_field]
    if not isinstance(text, str):
        raise PgolfError(
            f"{path}: line {number}: field {text_field!r} is {type(text).__name__}, "
            "expected a string"
        )
    try:
        # JSON escapes can smuggle in lone surrogates, which no tokenizer can encode.
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PgolfError(
            f"{path}: line {number}: field {text_field!r} holds a lone surrogate escape, "
            "expected valid Unicode text"
        ) from None
    return text


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise PgolfError(f"{path}: not a readable parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise PgolfError(
            f"{path}: no column {text_field!r} (columns: {', '.join(names)}); "
            "pass the text column's name"
        )
    column_type = parquet.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise PgolfError(f"{path}: column {text_field!r} has type {column_type}, expected strings")
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise PgolfError(f"{path}: row {row} has a null {text_field!r}")
                row += 1
                yield text
    except pa.ArrowException as exc:
        raise PgolfError(f"{path}: cannot read parquet data near row {row} ({exc})") from None
