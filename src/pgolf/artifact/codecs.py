"""Per-section codecs of the version-2 container (SPEC §5.25) and the choice among them.

A section is a run of same-dtype arrays compressed together. Each codec maps (raw bytes, itemsize)
to bytes and back; `smallest` tries the candidates and keeps the shortest output, because which
back-end wins depends on the data: the entropy coder wins on quantised int weights, byte-shuffled
brotli on float16 scales, and plain LZ on near-constant control tensors.

Settings are each back-end's strongest (zstd 22, lzma preset 9 + extreme, brotli 11), as the
records use them. lzma here is a raw LZMA2 stream: the .xz wrapper would add ~60 bytes per section
that carry nothing the artifact's own header does not already say.

The optional back-ends (zstandard, brotli) are imported here, on first use, for both container
layouts: the container imports this module, never the other way round.
"""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from pgolf.artifact import rans
from pgolf.errors import PgolfError

_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


class SectionCodec(NamedTuple):
    compress: Callable[[bytes, int], bytes]
    decompress: Callable[[bytes, int, int], bytes]  # (blob, itemsize, raw length) -> raw
    applies: Callable[[str], bool]  # dtype name -> usable for it


def zstd_module():
    try:
        import zstandard
    except ImportError as e:  # optional at runtime: only artifacts that use zstd need it
        raise PgolfError(
            "codec 'zstd' needs the 'zstandard' package (pip install zstandard)"
        ) from e
    return zstandard


def brotli_module():
    try:
        import brotli
    except ImportError as e:
        raise PgolfError("codec 'brotli' needs the 'brotli' package (pip install brotli)") from e
    return brotli


def byte_shuffle(raw: bytes, itemsize: int) -> bytes:
    """Group byte k of every item together (all low bytes, then all high bytes, ...).

    For float16 scales the exponent bytes are nearly constant and the mantissa bytes noisy;
    separated, the compressor sees one very compressible stream instead of an interleaving
    (SPEC §5.25, S1394's byte-shuffle).
    """
    if itemsize == 1 or not raw:
        return raw
    return np.frombuffer(raw, np.uint8).reshape(-1, itemsize).T.tobytes()


def byte_unshuffle(raw: bytes, itemsize: int) -> bytes:
    if itemsize == 1 or not raw:
        return raw
    return np.frombuffer(raw, np.uint8).reshape(itemsize, -1).T.tobytes()


def _rans_compress(raw: bytes, itemsize: int) -> bytes:
    return rans.encode(np.frombuffer(raw, np.int8))


def _rans_decompress(blob: bytes, itemsize: int, raw_nbytes: int) -> bytes:
    return rans.decode(blob).astype(np.int8).tobytes()


def _any(dtype: str) -> bool:
    return True


SECTION_CODECS: dict[str, SectionCodec] = {
    "none": SectionCodec(lambda b, i: b, lambda b, i, n: b, _any),
    "zlib": SectionCodec(
        lambda b, i: zlib.compress(b, 9), lambda b, i, n: zlib.decompress(b), _any
    ),
    "zstd": SectionCodec(
        lambda b, i: zstd_module().ZstdCompressor(level=22).compress(b),
        lambda b, i, n: zstd_module().ZstdDecompressor().decompress(b, max_output_size=n),
        _any,
    ),
    "lzma": SectionCodec(
        lambda b, i: lzma.compress(b, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS),
        lambda b, i, n: lzma.decompress(b, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS),
        _any,
    ),
    "brotli": SectionCodec(
        lambda b, i: brotli_module().compress(b, quality=11),
        lambda b, i, n: brotli_module().decompress(b),
        _any,
    ),
    "shuffle-brotli": SectionCodec(
        lambda b, i: brotli_module().compress(byte_shuffle(b, i), quality=11),
        lambda b, i, n: byte_unshuffle(brotli_module().decompress(b), i),
        lambda dtype: dtype not in ("int8", "uint8", "bool"),  # identical to brotli there
    ),
    # Order-0 entropy coder over the int8 symbols (quantised weights): pgolf.artifact.rans.
    "rans": SectionCodec(_rans_compress, _rans_decompress, lambda dtype: dtype == "int8"),
}
# What `auto` tries, cheapest to run first.
AUTO_CODECS = ("rans", "zstd", "shuffle-brotli", "brotli", "lzma")


def get_section_codec(name: str, source: str) -> SectionCodec:
    codec = SECTION_CODECS.get(name)
    if codec is None:
        raise PgolfError(
            f"{source}: unknown codec {name!r}, expected one of {', '.join(SECTION_CODECS)}"
        )
    return codec


def compress_section(
    raw: bytes, dtype: str, itemsize: int, candidates: Sequence[str]
) -> tuple[str, bytes, dict[str, int]]:
    """Compress with every applicable candidate; return (winner, its bytes, size per candidate).

    Ties go to the earlier candidate. A candidate that does not apply to the dtype is skipped;
    if none applies, the section is stored with zstd, which takes anything.
    """
    sizes: dict[str, int] = {}
    best: tuple[str, bytes] | None = None
    for name in candidates:
        codec = get_section_codec(name, "pack")
        if not codec.applies(dtype):
            continue
        blob = codec.compress(raw, itemsize)
        sizes[name] = len(blob)
        if best is None or len(blob) < len(best[1]):
            best = (name, blob)
    if best is None:
        blob = SECTION_CODECS["zstd"].compress(raw, itemsize)
        sizes["zstd"] = len(blob)
        best = ("zstd", blob)
    return best[0], best[1], sizes
