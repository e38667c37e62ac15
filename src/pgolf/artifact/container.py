"""The pgolf artifact container: named arrays + JSON metadata, compressed, checksummed, no pickle.

The submission's model bytes (SPEC §1.2) are this file, so the format is plain data that anyone can
read with `json` and `numpy.frombuffer`; loading never executes code (DESIGN "Artifacts are data").

Two layouts share the preamble; readers accept both.

Version 1 (`pack_artifact`, the official int8 path): one payload, one codec. All integers
little-endian:

    offset  size  field
    0       5     magic b"PGOLF"
    5       1     format version (1)
    6       4     uint32 N = length of the header
    10      N     UTF-8 JSON header (an object, see below)
    10+N    rest  the payload, compressed by `header["codec"]`

Header keys:
    codec              name in CODECS that compressed the payload
    compressed_nbytes  length of the compressed payload (the rest of the file)
    payload_sha256     hex sha256 of the compressed payload, verified before decompressing
    payload_nbytes     length of the uncompressed payload
    tensors            list of {name, dtype, shape, offset, nbytes}, in payload order
    meta               free-form JSON chosen by the writer (e.g. the quantisation scheme)

The uncompressed payload is every tensor's raw little-endian C-order bytes, back to back in header
order with no padding: padding would be counted against the 16,000,000-byte cap for nothing, and
readers copy each array out anyway. `bfloat16` has no numpy dtype; it travels as its raw uint16
bits, and on the numpy side is a uint16 array whose dtype carries the marker in `BFLOAT16`
(`tensor_to_array` / `array_to_tensor` convert to and from torch).

Version 2 (`pack_sections`): tensors are grouped into sections and each section carries its own
codec (`pgolf.artifact.codecs`), so quantised weights can use the entropy coder while fp16 scales
use byte-shuffled brotli. The whole file after the checksum is covered by it, header included,
and the header itself is brotli-compressed JSON because per-tensor names and metadata of a
~200-tensor model would otherwise cost tens of kilobytes of the 16,000,000-byte cap:

    offset  size  field
    0       5     magic b"PGOLF"
    5       1     format version (2)
    6       4     uint32 N = length of the compressed header
    10      32    sha256 of every byte from offset 42 to the end
    42      N     brotli(UTF-8 JSON header)
    42+N    rest  the sections' compressed bytes, back to back in header order

Header: {"sections": [{"codec", "nbytes", "tensors": [[name, dtype, shape], ...]}], "meta"}.
A section's uncompressed bytes are its tensors' raw little-endian C-order bytes back to back.
Version 1 stays the writer of the official int8 artifact so that its bytes do not change.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import struct
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pgolf.artifact import codecs, rans
from pgolf.errors import PgolfError
from pgolf.fileio import atomic_write

MAGIC = b"PGOLF"
FORMAT_VERSION = 1  # whole-payload layout
SECTIONS_VERSION = 2  # per-section codecs
READABLE_VERSIONS = (FORMAT_VERSION, SECTIONS_VERSION)
_PREAMBLE = struct.Struct("<5sBI")  # magic, version, header length
_DIGEST = 32  # raw sha256 after the version-2 preamble

# A uint16 dtype tagged as bfloat16 bits. numpy keeps dtype metadata through copy/reshape/slicing,
# and `==` ignores it, so always test for bfloat16 with `is_bfloat16`, never by comparing dtypes.
BFLOAT16 = np.dtype(np.uint16, metadata={"pgolf": "bfloat16"})

# Storage dtype names -> little-endian numpy dtypes. Extra names beyond the int8 baseline's needs
# (bool, uint16, float64) cost nothing and let any plain state-dict buffer pass through.
DTYPES: dict[str, np.dtype] = {
    "bool": np.dtype("|b1"),
    "int8": np.dtype("|i1"),
    "uint8": np.dtype("|u1"),
    "int16": np.dtype("<i2"),
    "uint16": np.dtype("<u2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "bfloat16": np.dtype("<u2"),
}


class Codec(NamedTuple):
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes], bytes]


def _zstd_compress(data: bytes) -> bytes:
    # The records use plain level 22 without long-distance matching (SPEC §5.25).
    return codecs.zstd_module().ZstdCompressor(level=22).compress(data)


def _zstd_decompress(data: bytes) -> bytes:
    return codecs.zstd_module().ZstdDecompressor().decompress(data)


def _lzma_compress(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)


def _brotli_compress(data: bytes) -> bytes:
    return codecs.brotli_module().compress(data, quality=11)


def _brotli_decompress(data: bytes) -> bytes:
    return codecs.brotli_module().decompress(data)


# Whole-payload codecs; the settings are the strongest each back-end offers (SPEC §5.25).
CODECS: dict[str, Codec] = {
    "none": Codec(bytes, bytes),
    "zlib": Codec(lambda b: zlib.compress(b, 9), zlib.decompress),
    "zstd": Codec(_zstd_compress, _zstd_decompress),
    "lzma": Codec(_lzma_compress, lambda b: lzma.decompress(b, format=lzma.FORMAT_XZ)),
    "brotli": Codec(_brotli_compress, _brotli_decompress),
}


def is_bfloat16(dtype: np.dtype) -> bool:
    return dtype.metadata is not None and dtype.metadata.get("pgolf") == "bfloat16"


def _storage_name(arr: np.ndarray) -> str:
    if is_bfloat16(arr.dtype):
        return "bfloat16"
    for name, dt in DTYPES.items():
        # Compare kind and size, not dtypes, so big-endian input maps to its little-endian twin.
        if name != "bfloat16" and (arr.dtype.kind, arr.dtype.itemsize) == (dt.kind, dt.itemsize):
            return name
    raise TypeError(f"unsupported dtype {arr.dtype}; supported: {', '.join(DTYPES)}")


def _get_codec(name: str, source: str) -> Codec:
    codec = CODECS.get(name)
    if codec is None:
        raise PgolfError(f"{source}: unknown codec {name!r}, expected one of {', '.join(CODECS)}")
    return codec


def pack_artifact(tensors: Mapping[str, np.ndarray], meta: dict, codec: str = "zlib") -> bytes:
    """Serialise named arrays and JSON-able `meta` into one artifact; same inputs, same bytes."""
    compress = _get_codec(codec, "pack_artifact").compress
    entries, chunks, offset = [], [], 0
    for name, arr in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        arr = np.asarray(arr)
        dtype_name = _storage_name(arr)
        raw = arr.astype(DTYPES[dtype_name], copy=False).tobytes(order="C")
        entries.append(
            {
                "name": name,
                "dtype": dtype_name,
                "shape": list(arr.shape),
                "offset": offset,
                "nbytes": len(raw),
            }
        )
        chunks.append(raw)
        offset += len(raw)
    compressed = compress(b"".join(chunks))
    header = {
        "codec": codec,
        "compressed_nbytes": len(compressed),
        "payload_sha256": hashlib.sha256(compressed).hexdigest(),
        "payload_nbytes": offset,
        "tensors": entries,
        "meta": meta,
    }
    # Compact separators: every header byte counts toward the cap. No NaN: keep it strict JSON.
    header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes + compressed


def _read_header(data: bytes, source: str) -> tuple[dict, int]:
    """Check magic, version and lengths; return the parsed header and where the payload starts."""
    if data[: len(MAGIC)] != MAGIC:
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            raise PgolfError(f"{source}: truncated artifact: {len(data)} bytes")
        raise PgolfError(
            f"{source}: not a pgolf artifact (wrong magic {data[:5]!r}, expected {MAGIC!r})"
        )
    if len(data) < _PREAMBLE.size:
        raise PgolfError(
            f"{source}: truncated artifact: {len(data)} bytes, preamble is {_PREAMBLE.size}"
        )
    _, version, header_len = _PREAMBLE.unpack_from(data)
    if version not in READABLE_VERSIONS:
        raise PgolfError(
            f"{source}: unsupported artifact format version {version}, expected one of "
            f"{READABLE_VERSIONS}"
        )
    start = _PREAMBLE.size + header_len
    if len(data) < start:
        raise PgolfError(
            f"{source}: truncated artifact: {len(data)} bytes, header alone needs {start}"
        )
    try:
        header = json.loads(data[_PREAMBLE.size : start].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise PgolfError(f"{source}: artifact header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise PgolfError(f"{source}: artifact header must be a JSON object")
    return header, start


def _field(header: dict, key: str, kind: type, source: str) -> Any:
    value = header.get(key)
    # bool is an int subclass; a length of `true` is malformed, not 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PgolfError(
            f"{source}: artifact header field {key!r} missing or not a {kind.__name__}"
        )
    return value


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def unpack_artifact(data: bytes, source: str = "<bytes>") -> tuple[dict[str, np.ndarray], dict]:
    """Verify and parse an artifact; return (name -> array, meta). Errors name `source`."""
    data = bytes(data)
    if len(data) >= _PREAMBLE.size and data[: len(MAGIC)] == MAGIC and data[5] == SECTIONS_VERSION:
        return _unpack_sections(data, source)
    header, start = _read_header(data, source)
    codec = _get_codec(_field(header, "codec", str, source), source)
    expected_compressed = _field(header, "compressed_nbytes", int, source)
    payload_nbytes = _field(header, "payload_nbytes", int, source)
    entries = _field(header, "tensors", list, source)
    compressed = data[start:]
    if len(compressed) < expected_compressed:
        raise PgolfError(
            f"{source}: truncated artifact: payload has {len(compressed)} bytes, "
            f"header expects {expected_compressed}"
        )
    if len(compressed) > expected_compressed:
        raise PgolfError(
            f"{source}: {len(compressed) - expected_compressed} unexpected bytes after the payload"
        )
    if hashlib.sha256(compressed).hexdigest() != _field(header, "payload_sha256", str, source):
        raise PgolfError(f"{source}: payload checksum mismatch (sha256), the file is corrupt")
    try:
        payload = codec.decompress(compressed)
    except PgolfError:
        raise
    except Exception as e:  # each back-end has its own error type; all mean "bad payload"
        raise PgolfError(
            f"{source}: cannot decompress payload with {header['codec']!r}: {e}"
        ) from None
    if len(payload) != payload_nbytes:
        raise PgolfError(f"{source}: payload is {len(payload)} bytes, header says {payload_nbytes}")

    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        name, arr, offset = _read_tensor(entry, payload, offset, source)
        if name in tensors:
            raise PgolfError(f"{source}: tensor {name!r} appears twice in the header")
        tensors[name] = arr
    if offset != len(payload):
        raise PgolfError(
            f"{source}: header tensors cover {offset} bytes but the payload has {len(payload)}"
        )
    meta = header.get("meta", {})
    return tensors, meta


def _read_tensor(
    entry: Any, payload: bytes, offset: int, source: str
) -> tuple[str, np.ndarray, int]:
    """Decode one header entry that must start at `offset`; return name, array, next offset."""
    if not isinstance(entry, dict):
        raise PgolfError(f"{source}: tensor entry must be a JSON object, got {entry!r}")
    name, dtype_name, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
    _check_tensor_entry(name, dtype_name, shape, entry, source)
    stored = DTYPES[dtype_name]
    nbytes = math.prod(shape) * stored.itemsize
    if entry.get("offset") != offset or entry.get("nbytes") != nbytes:
        raise PgolfError(
            f"{source}: tensor {name!r} header (offset {entry.get('offset')!r}, "
            f"nbytes {entry.get('nbytes')!r}) does not match payload layout "
            f"(offset {offset}, {nbytes} bytes for shape {shape} {dtype_name})"
        )
    if offset + nbytes > len(payload):
        raise PgolfError(
            f"{source}: tensor {name!r} ends at byte {offset + nbytes}, payload has {len(payload)}"
        )
    out_dtype = BFLOAT16 if dtype_name == "bfloat16" else stored.newbyteorder("=")
    flat = np.frombuffer(payload, dtype=stored, count=math.prod(shape), offset=offset)
    # Copy: callers get aligned, writable, native-order arrays independent of the payload buffer.
    arr = flat.astype(out_dtype, copy=True).reshape(shape)
    return name, arr, offset + nbytes


def write_artifact(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    meta: dict,
    codec: str = "zlib",
) -> int:
    """Pack and write atomically; return the file size in bytes (what counts toward the cap)."""
    data = pack_artifact(tensors, meta, codec)
    with atomic_write(path) as f:
        f.write(data)
    return len(data)


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PgolfError(f"{path}: artifact file not found") from None
    except IsADirectoryError:
        raise PgolfError(f"{path}: expected an artifact file, found a directory") from None
    return unpack_artifact(data, source=str(path))


def tensor_to_array(t) -> np.ndarray:
    """torch.Tensor -> numpy array for the container; bfloat16 becomes BFLOAT16-tagged bits."""
    import torch  # container readers should not need torch; only these converters do

    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16).astype(BFLOAT16)
    return t.numpy()


def array_to_tensor(arr: np.ndarray):
    """Inverse of `tensor_to_array`: BFLOAT16-tagged arrays come back as torch.bfloat16."""
    import torch

    # A private C-order copy (np.ascontiguousarray would turn 0-d arrays into 1-d ones).
    arr = np.array(arr, order="C", copy=True)
    if is_bfloat16(arr.dtype):
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


# -- version 2: per-section codecs ------------------------------------------------------------
class PackedArtifact(NamedTuple):
    data: bytes  # the file's bytes; len(data) is what counts toward the cap
    sections: list[dict]  # per section: names, codec, nbytes, raw_nbytes, candidates, entropy


# A quantised int8 tensor this large gets a section (and a frequency table) of its own; smaller
# ones share a section with their dtype-mates, where one codec header serves them all.
OWN_SECTION_MIN_NUMEL = 65_536


def default_groups(tensors: Mapping[str, np.ndarray]) -> list[list[str]]:
    """Big int8 tensors one per section, everything else one section per storage dtype."""
    groups: list[list[str]] = []
    by_dtype: dict[str, list[str]] = {}
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        dtype = _storage_name(arr)
        if dtype == "int8" and arr.size >= OWN_SECTION_MIN_NUMEL:
            groups.append([name])
        else:
            if dtype not in by_dtype:
                by_dtype[dtype] = []
                groups.append(by_dtype[dtype])
            by_dtype[dtype].append(name)
    return groups


def pack_sections(
    tensors: Mapping[str, np.ndarray],
    meta: dict,
    codec: str = "auto",
    groups: list[list[str]] | None = None,
    candidates: tuple[str, ...] | None = None,
    section_codecs: list[str] | None = None,
) -> PackedArtifact:
    """Serialise into the version-2 layout; `codec="auto"` keeps the smallest per section.

    `candidates` narrows what `auto` tries (default `codecs.AUTO_CODECS`). A named codec that does
    not apply to a section's dtype (the entropy coder on float16) leaves that section to `auto`.
    `section_codecs` fixes each section's codec (same groups), e.g. to repack after pruning with
    the codecs an earlier `auto` pack chose, without trying every back-end again.
    """
    if codec != "auto":
        codecs.get_section_codec(codec, "pack_sections")
    groups = default_groups(tensors) if groups is None else groups
    names = [n for g in groups for n in g]
    if sorted(names) != sorted(tensors) or len(set(names)) != len(names):
        raise ValueError("groups must list every tensor exactly once")
    entries, blobs, report = [], [], []
    if section_codecs is not None and len(section_codecs) != len(groups):
        raise ValueError("section_codecs needs one codec per group")
    for i, group in enumerate(groups):
        arrays = [np.asarray(tensors[n]) for n in group]
        dtypes = {_storage_name(a) for a in arrays}
        if len(dtypes) != 1:
            raise ValueError(f"section {group[:3]}... mixes dtypes {sorted(dtypes)}")
        dtype = dtypes.pop()
        stored = DTYPES[dtype]
        raw = b"".join(a.astype(stored, copy=False).tobytes(order="C") for a in arrays)
        tried = candidates or codecs.AUTO_CODECS
        if codec != "auto" and codecs.SECTION_CODECS[codec].applies(dtype):
            tried = (codec,)
        if section_codecs is not None:
            tried = (section_codecs[i],)
        chosen, blob, sizes = codecs.compress_section(raw, dtype, stored.itemsize, tried)
        entries.append(
            {
                "codec": chosen,
                "nbytes": len(blob),
                "tensors": [[n, dtype, list(a.shape)] for n, a in zip(group, arrays, strict=True)],
            }
        )
        blobs.append(blob)
        entropy = None
        if dtype == "int8":
            entropy = rans.entropy_bytes(np.frombuffer(raw, np.int8))
        report.append(
            {
                "names": list(group),
                "dtype": dtype,
                "codec": chosen,
                "nbytes": len(blob),
                "raw_nbytes": len(raw),
                "candidates": sizes,
                "entropy_bytes": entropy,
            }
        )
    header = {"sections": entries, "meta": meta}
    header_json = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    header_blob = codecs.brotli_module().compress(header_json, quality=11)
    body = header_blob + b"".join(blobs)
    digest = hashlib.sha256(body).digest()
    data = _PREAMBLE.pack(MAGIC, SECTIONS_VERSION, len(header_blob)) + digest + body
    return PackedArtifact(data, report)


def write_sections(path: str | os.PathLike, packed: PackedArtifact) -> int:
    with atomic_write(path) as f:
        f.write(packed.data)
    return len(packed.data)


def _unpack_sections(data: bytes, source: str) -> tuple[dict[str, np.ndarray], dict]:
    start = _PREAMBLE.size + _DIGEST
    if len(data) < start:
        raise PgolfError(f"{source}: truncated artifact: {len(data)} bytes, preamble is {start}")
    _, _, header_len = _PREAMBLE.unpack_from(data)
    if len(data) < start + header_len:
        raise PgolfError(
            f"{source}: truncated artifact: {len(data)} bytes, header alone needs "
            f"{start + header_len}"
        )
    header = None
    try:
        header = json.loads(codecs.brotli_module().decompress(data[start : start + header_len]))
    except PgolfError:
        raise
    except Exception:
        pass  # reported below: a checksum mismatch is the more useful message
    if isinstance(header, dict) and isinstance(header.get("sections"), list):
        expected = start + header_len
        expected += sum(s.get("nbytes", 0) for s in header["sections"] if isinstance(s, dict))
        if isinstance(expected, int) and len(data) < expected:
            raise PgolfError(
                f"{source}: truncated artifact: {len(data)} bytes, header expects {expected}"
            )
    if hashlib.sha256(data[_PREAMBLE.size + _DIGEST :]).digest() != data[_PREAMBLE.size : start]:
        raise PgolfError(f"{source}: checksum mismatch (sha256), the file is corrupt")
    if not isinstance(header, dict):
        raise PgolfError(f"{source}: artifact header is not brotli-compressed JSON")
    sections = _field(header, "sections", list, source)
    pos = start + header_len
    tensors: dict[str, np.ndarray] = {}
    for section in sections:
        if not isinstance(section, dict):
            raise PgolfError(f"{source}: section entry must be a JSON object, got {section!r}")
        name = _field(section, "codec", str, source)
        codec = codecs.get_section_codec(name, source)
        nbytes = _field(section, "nbytes", int, source)
        items = _field(section, "tensors", list, source)
        layout = [_section_item(item, source) for item in items]
        dtypes = {d for _, d, _ in layout}
        if len(dtypes) > 1:
            raise PgolfError(f"{source}: a section mixes dtypes {sorted(dtypes)}")
        itemsize = DTYPES[dtypes.pop()].itemsize if layout else 1
        raw_nbytes = sum(math.prod(shape) * DTYPES[d].itemsize for _, d, shape in layout)
        blob = data[pos : pos + nbytes]
        pos += nbytes
        try:
            raw = codec.decompress(blob, itemsize, raw_nbytes)
        except PgolfError:
            raise
        except Exception as e:  # each back-end has its own error type; all mean "bad section"
            raise PgolfError(f"{source}: cannot decompress a {name!r} section: {e}") from None
        if len(raw) != raw_nbytes:
            raise PgolfError(
                f"{source}: a {name!r} section holds {len(raw)} bytes, its tensors need "
                f"{raw_nbytes}"
            )
        offset = 0
        for tname, dtype_name, shape in layout:
            if tname in tensors:
                raise PgolfError(f"{source}: tensor {tname!r} appears twice in the header")
            stored = DTYPES[dtype_name]
            count = math.prod(shape)
            out_dtype = BFLOAT16 if dtype_name == "bfloat16" else stored.newbyteorder("=")
            flat = np.frombuffer(raw, dtype=stored, count=count, offset=offset)
            tensors[tname] = flat.astype(out_dtype, copy=True).reshape(shape)
            offset += count * stored.itemsize
    if pos != len(data):
        raise PgolfError(f"{source}: {len(data) - pos} unexpected bytes after the last section")
    meta = header.get("meta", {})
    return tensors, meta


def _section_item(item: Any, source: str) -> tuple[str, str, list[int]]:
    if not (isinstance(item, list) and len(item) == 3):
        raise PgolfError(f"{source}: tensor entry must be [name, dtype, shape], got {item!r}")
    name, dtype_name, shape = item
    _check_tensor_entry(name, dtype_name, shape, item, source)
    return name, dtype_name, shape


def _check_tensor_entry(name: Any, dtype_name: Any, shape: Any, raw: Any, source: str) -> None:
    """A header's description of one tensor (both layouts): a name, a known dtype, a shape."""
    if not isinstance(name, str):
        raise PgolfError(f"{source}: tensor entry without a string name: {raw!r}")
    if dtype_name not in DTYPES:
        raise PgolfError(
            f"{source}: tensor {name!r} has dtype {dtype_name!r}, "
            f"expected one of {', '.join(DTYPES)}"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise PgolfError(f"{source}: tensor {name!r} has invalid shape {shape!r}")
