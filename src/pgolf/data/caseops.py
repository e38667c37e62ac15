"""CaseOps: the frontier record's lossless case transform and its per-token byte sidecar.

The TOP record (SPEC §5.31) tokenizes text in which ASCII capitals are replaced by operators, so
that "The", "THE" and "the" share one lowercase piece. Over each maximal run of ASCII letters:

- an all-lowercase word is unchanged;
- a word of two or more letters, all capitals, becomes ALLCAPS + the word in lowercase;
- any other word with a capital becomes [TITLE if its first letter is a capital] + the word in
  lowercase, with CAPNEXT before every later letter that was a capital ("McDonald" → TITLE m c
  CAPNEXT d o n a l d);
- a literal operator character in the text is escaped as ESC + that character.

The operators are the private-use characters U+E001–U+E004, reserved as single pieces in the
record's SP8192 tokenizer. Because the transform adds bytes, BPB must count the *original* text:
`pgolf data build --caseops` writes, beside every val shard `fineweb_val_NNNNNN.bin`, a sidecar
`fineweb_val_bytes_NNNNNN.bin` in the same shard format whose i-th uint16 is the number of
original UTF-8 bytes token i stands for (SPEC §2.3). Operators and BOS stand for 0 bytes; an
escaped literal for its own 3. A piece covers the span of input text SentencePiece reports for it
(its "surface"), so whitespace that normalisation collapses still counts in full; only whitespace
at the very start or end of a document is in no piece's span, and so in no count.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from pgolf.data.shards import BYTE_SIDECAR, MAX_VOCAB, read_header, read_shard, shard_name
from pgolf.errors import PgolfError

TRANSFORM = "lossless_caps_caseops_v1"
TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = TITLE + ALLCAPS + CAPNEXT + ESC

# A capital or an operator starts a match, which runs to the end of the ASCII word. Scanning for
# these (rare) characters is several times faster than visiting every word.
_CAPITALS = re.compile(r"[A-Z\ue001-\ue004][A-Za-z]*")
# An operator and what it acts on: ESC a literal, ALLCAPS a word, TITLE and CAPNEXT a letter.
_DECODE = re.compile(r"[\ue001-\ue004](?:(?<=\ue004).|(?<=\ue002)[a-z]+|[a-z])", re.DOTALL)
_VAL_SHARD = re.compile(r"^fineweb_val_(\d{6})\.bin$")
_OPERATOR_UTF8 = OPERATORS[0].encode()[:2]  # the lead bytes U+E001–U+E004 share
_OPERATOR_BYTES = len(OPERATORS[0].encode())


def _mark_capitals(letters: str) -> str:
    return "".join(CAPNEXT + c.lower() if c.isupper() else c for c in letters)


def _encode_word(word: str) -> str:
    """A whole ASCII word (possibly empty)."""
    rest = word[1:]
    if not rest or rest.islower():  # the common case, tested first for speed
        return (TITLE if word[:1].isupper() else "") + word.lower()
    if word.isupper():
        return ALLCAPS + word.lower()
    return (TITLE if word[0].isupper() else "") + word[0].lower() + _mark_capitals(rest)


def _encode_match(m: re.Match) -> str:
    text, start = m.string, m.start()
    if text[start] in OPERATORS:  # a literal: escaped; the letters after it are a word
        return ESC + text[start] + _encode_word(m.group()[1:])
    if start and "a" <= text[start - 1] <= "z":  # the rest of a word such as "iPhone"
        return _mark_capitals(m.group())
    return _encode_word(m.group())


def encode_case(text: str) -> str:
    """The record's `lossless_caps_caseops_v1` forward transform."""
    return _CAPITALS.sub(_encode_match, text)


def _decode_match(m: re.Match) -> str:
    op, target = m.group()[0], m.group()[1:]
    return target if op == ESC else target.upper()


def decode_case(text: str) -> str:
    """The exact inverse of `encode_case`; any string `encode_case` cannot produce is refused.

    (The record's decoder is more lenient with such strings, e.g. TITLE before CAPNEXT; on every
    string the transform produces, the two agree.)
    """
    original = _DECODE.sub(_decode_match, text)
    if encode_case(original) != text:
        raise PgolfError(f"not a CaseOps-encoded string ({text[:40]!r}…)")
    return original


def original_byte_counts(surfaces: Iterable[bytes]) -> list[int]:
    """Original UTF-8 bytes behind each piece, given the pieces' surfaces in order.

    The transform only lowercases ASCII letters (same length) and inserts operators, so a piece's
    original bytes are its surface's bytes less 3 for each operator acting as one. An ESC acts
    (0 bytes) and makes the next character, possibly in the next piece, a literal (3 bytes).
    """
    counts = []
    escaped = False
    for surface in surfaces:
        n = len(surface)
        if _OPERATOR_UTF8 in surface or escaped:
            for ch in surface.decode("utf-8"):
                if escaped:
                    escaped = False
                elif ch in OPERATORS:
                    n -= _OPERATOR_BYTES
                    escaped = ch == ESC
        counts.append(n)
    return counts


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _ids_and_surfaces(serialized: bytes) -> tuple[list[int], list[bytes]]:
    """Token ids and surfaces from SentencePiece's serialized `SentencePieceText`.

    Its `pieces` are field 2; in each, `id` is field 2 and `surface` field 3 (absent when zero or
    empty). Reading the protobuf wire format here spares a protobuf dependency. Every field
    number is below 16, so each key is one byte.
    """
    ids, surfaces = [], []
    i, n = 0, len(serialized)
    while i < n:
        key = serialized[i]
        if key & 7 == 5:  # fixed32 (the score): key + 4 bytes
            i += 5
            continue
        size, i = _varint(serialized, i + 1)
        if key & 7 == 0:
            continue
        end = i + size
        if key == 0x12:
            piece_id, surface = 0, b""
            while i < end:
                field = serialized[i]
                value, i = _varint(serialized, i + 1)
                if field == 0x10:
                    piece_id = value
                elif field & 7 == 2:
                    if field == 0x1A:
                        surface = serialized[i : i + value]
                    i += value
            ids.append(piece_id)
            surfaces.append(surface)
        i = end
    return ids, surfaces


def encode_documents(
    sp, texts: Sequence[str], with_bytes: bool
) -> tuple[list[list[int]], list[list[int]] | None]:
    """Token ids of each transformed text and, with `with_bytes`, its original byte counts."""
    transformed = [encode_case(t) for t in texts]
    if not with_bytes:
        return sp.encode(transformed, out_type=int), None
    ids, counts = [], []
    for serialized in sp.encode(transformed, out_type="serialized_proto"):
        doc_ids, surfaces = _ids_and_surfaces(serialized)
        ids.append(doc_ids)
        counts.append(original_byte_counts(surfaces))
    return ids, counts


def check_tokenizer(sp, path) -> None:
    """The operators must be pieces of their own, as in the record's tokenizer.

    (Any tokenizer would stay lossless, spelling them in byte-fallback pieces, but it is not the
    record's setup and wastes three tokens per capital.)
    """
    missing = [f"U+{ord(op):04X}" for op in OPERATORS if sp.piece_to_id(op) == sp.unk_id()]
    if missing:
        raise PgolfError(
            f"{path}: not a CaseOps tokenizer: no piece for the operators {', '.join(missing)}; "
            f"use the record's fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
        )


def check_counts_fit(counts: list[list[int]], source: str) -> None:
    """A sidecar entry is a uint16: refuse a piece standing for more bytes than that holds."""
    largest = max((max(c) for c in counts if c), default=0)
    if largest >= MAX_VOCAB:
        raise PgolfError(
            f"{source}: one token stands for {largest:,} original bytes (a whitespace run?); "
            f"the byte sidecar holds at most {MAX_VOCAB - 1:,} per token"
        )


def sidecar_path(val_shard: str | Path) -> Path | None:
    """`fineweb_val_bytes_NNNNNN.bin` beside `fineweb_val_NNNNNN.bin`; None for other names."""
    val_shard = Path(val_shard)
    found = _VAL_SHARD.match(val_shard.name)
    if found is None:
        return None
    return val_shard.with_name(shard_name(BYTE_SIDECAR, int(found.group(1))))


def _recorded_caseops(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        return bool(meta["caseops"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_byte_sidecar(val_shards: Sequence[str | Path]) -> np.ndarray | None:
    """The original byte count of every val token, aligned with the concatenated val shards.

    None when no val shard has a sidecar (the tokenizer's byte tables then count bytes). Every
    shard must have one, of its own length, once any does or its meta.json records CaseOps: a
    partial sidecar would silently mix the two ways of counting.
    """
    paths = [sidecar_path(p) for p in val_shards]
    present = [p is not None and p.is_file() for p in paths]
    caseops = any(_recorded_caseops(Path(p).parent) for p in val_shards)
    if not any(present) and not caseops:
        return None
    arrays = []
    for shard, side in zip(val_shards, paths, strict=True):
        if side is None or not side.is_file():
            expected = side or f"a fineweb_val_bytes_NNNNNN.bin for {shard}"
            raise PgolfError(
                f"{expected}: CaseOps byte sidecar missing; BPB of a CaseOps val shard must "
                f"count original bytes (rebuild with `pgolf data build --caseops`)"
            )
        if read_header(side) != read_header(shard):
            raise PgolfError(
                f"{side}: {read_header(side):,} byte counts for the {read_header(shard):,} tokens "
                f"of {shard}; expected one per token"
            )
        arrays.append(np.asarray(read_shard(side)))
    return np.concatenate(arrays)
