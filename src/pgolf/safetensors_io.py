"""Float weights in the safetensors format, written and read with torch alone.

The format is an 8-byte little-endian header length, a JSON header (name → dtype, shape, byte
range) and the raw little-endian tensor bytes. pgolf writes it itself so that the exported
submission script, which embeds this module, runs where only torch is installed. The
`safetensors` package reads these files and this module reads its files (tested both ways).
Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from pgolf.errors import PgolfError
from pgolf.fileio import atomic_write

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_BY_NAME = {name: dtype for dtype, name in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the `safetensors` package's own limit


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialise `tensors` (any device) in the safetensors layout: widest dtypes first, by name."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, dict] = {}
    blobs, offset = [], 0
    for name in order:
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name")
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the tensor bytes start 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_write(path) as f:
        f.write(safetensors_bytes(tensors))


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file into CPU tensors; a malformed file is a PgolfError naming it."""
    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"{path}: weights file not found")
    data = memoryview(path.read_bytes())
    try:
        (size,) = struct.unpack_from("<Q", data)
        if size > min(MAX_HEADER_BYTES, len(data) - 8):
            raise ValueError(f"header length {size} does not fit the file")
        header = json.loads(bytes(data[8 : 8 + size]))
        header.pop("__metadata__", None)
        body = data[8 + size :]
        tensors, end = {}, 0
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
            dtype = _BY_NAME[entry["dtype"]]
            begin, stop = entry["data_offsets"]
            shape = [int(n) for n in entry["shape"]]
            numel = int(torch.Size(shape).numel())
            if begin != end or stop - begin != numel * dtype.itemsize:
                raise ValueError(f"{name}: byte range {begin}..{stop} is not where it belongs")
            raw = bytearray(body[begin:stop])  # a copy: writable and aligned for torch
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(shape)
            end = stop
        if end != len(body):
            raise ValueError(f"{len(body) - end} bytes after the last tensor")
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PgolfError(f"{path}: not a valid safetensors file ({exc})") from None
    return tensors
