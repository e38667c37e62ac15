"""Version-2 container (per-section codecs) and the rANS entropy coder (SPEC §5.25)."""

from __future__ import annotations

import numpy as np
import pytest

from pgolf.artifact import codecs, rans
from pgolf.artifact.container import (
    BFLOAT16,
    pack_artifact,
    pack_sections,
    read_artifact,
    unpack_artifact,
    write_sections,
)
from pgolf.errors import PgolfError

DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "int64", "float16", "float32"]


def random_array(rng, dtype, shape):
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    target = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * target.itemsize, dtype=np.uint8)
    return raw.view(target).reshape(shape)


def int6_weights(rng, shape, sigma=6.0):
    return np.clip(np.round(rng.standard_normal(shape) * sigma), -31, 31).astype(np.int8)


def same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# --- rANS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 8191, 8192, 8193, 70_001, 300_000])
def test_rans_round_trip_is_bit_exact(n):
    rng = np.random.default_rng(n)
    sym = int6_weights(rng, n)
    out = rans.decode(rans.encode(sym))
    assert out.dtype == np.int16 and np.array_equal(out, sym)


@pytest.mark.parametrize(
    "symbols",
    [
        np.full(5000, -7, np.int8),  # one symbol
        np.array([-128, 127] * 3000, np.int8),  # the full int8 span
        np.where(np.arange(50_000) % 997 == 0, 5, 0).astype(np.int8),  # extreme skew
        np.random.default_rng(0).integers(-128, 128, 40_000).astype(np.int8),  # uniform
    ],
)
def test_rans_round_trip_edge_cases(symbols):
    assert np.array_equal(rans.decode(rans.encode(symbols)), symbols)


def test_rans_is_within_half_a_percent_of_the_order0_bound_on_int6_weights():
    sym = int6_weights(np.random.default_rng(1), 1_000_000)
    bound = rans.entropy_bytes(sym)
    size = len(rans.encode(sym))
    assert bound <= size < bound * 1.005
    estimate = rans.coded_bytes_estimate(np.bincount(sym.astype(int) + 31))
    assert abs(estimate - size) < 0.001 * size


def test_rans_rejects_corrupt_streams():
    blob = bytearray(rans.encode(int6_weights(np.random.default_rng(2), 100_000)))
    with pytest.raises(ValueError):
        rans.decode(bytes(blob[:-10]))
    blob[40] ^= 0xFF  # inside the frequency table
    with pytest.raises(ValueError):
        rans.decode(bytes(blob))


def test_byte_shuffle_round_trips():
    raw = np.random.default_rng(3).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    for itemsize in (1, 2, 4, 8):
        assert codecs.byte_unshuffle(codecs.byte_shuffle(raw, itemsize), itemsize) == raw


# --- version-2 container ------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["auto", *sorted(codecs.SECTION_CODECS)])
def test_sections_round_trip_bit_exact_with_every_codec(codec):
    rng = np.random.default_rng(4)
    tensors = {f"t.{d}": random_array(rng, d, (3, 5)) for d in DTYPES}
    tensors["bf"] = random_array(rng, "bfloat16", (4,))
    tensors["w"] = int6_weights(rng, (80, 256))
    tensors["empty"] = np.zeros((0, 3), np.float32)
    packed = pack_sections(tensors, {"k": [1]}, codec=codec)
    assert packed.data == pack_sections(tensors, {"k": [1]}, codec=codec).data  # deterministic
    out, meta = unpack_artifact(packed.data)
    assert meta == {"k": [1]} and sorted(out) == sorted(tensors)  # grouped by section
    assert all(same(out[n], tensors[n]) for n in tensors)


def test_auto_picks_the_smallest_codec_per_section_and_reports_entropy():
    rng = np.random.default_rng(5)
    tensors = {"w": int6_weights(rng, (512, 512)), "s": rng.random(512).astype(np.float16)}
    packed = pack_sections(tensors, {})
    by_name = {s["names"][0]: s for s in packed.sections}
    for sec in packed.sections:
        assert sec["nbytes"] == min(sec["candidates"].values())
    assert by_name["w"]["codec"] == "rans"
    assert (
        by_name["w"]["entropy_bytes"]
        <= by_name["w"]["nbytes"]
        < 1.01 * by_name["w"]["entropy_bytes"]
    )


def test_version_1_artifacts_still_load():
    tensors = {"a": np.arange(6, dtype=np.int16)}
    out, meta = unpack_artifact(pack_artifact(tensors, {"v": 1}, codec="zlib"))
    assert meta == {"v": 1} and same(out["a"], tensors["a"])


@pytest.fixture
def v2_file(tmp_path):
    rng = np.random.default_rng(6)
    tensors = {"w": int6_weights(rng, (256, 300)), "s": rng.random(256).astype(np.float16)}
    path = tmp_path / "artifact.pgolf"
    write_sections(path, pack_sections(tensors, {"m": 1}, candidates=("rans", "zstd")))
    return path


def rewrite(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("offset", [12, 50, -100, -1])
def test_any_flipped_byte_fails_the_checksum(v2_file, offset):
    data = bytearray(v2_file.read_bytes())
    data[offset] ^= 0x10
    with pytest.raises(PgolfError, match="checksum") as e:
        read_artifact(rewrite(v2_file, bytes(data)))
    assert str(v2_file) in str(e.value)


@pytest.mark.parametrize("keep", [3, 6, 20, 45, 0.5, -1])
def test_truncated_v2_file_is_reported(v2_file, keep):
    data = v2_file.read_bytes()
    cut = data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep]
    with pytest.raises(PgolfError, match="truncated") as e:
        read_artifact(rewrite(v2_file, cut))
    assert str(v2_file) in str(e.value)


def test_unknown_section_codec_is_reported(v2_file):
    import hashlib
    import json
    import struct

    import brotli

    data = v2_file.read_bytes()
    (hlen,) = struct.unpack_from("<I", data, 6)
    header = json.loads(brotli.decompress(data[42 : 42 + hlen]))
    header["sections"][0]["codec"] = "lrzip"
    new = brotli.compress(json.dumps(header).encode())
    body = new + data[42 + hlen :]
    forged = data[:6] + struct.pack("<I", len(new)) + hashlib.sha256(body).digest() + body
    with pytest.raises(PgolfError, match="unknown codec 'lrzip'") as e:
        read_artifact(rewrite(v2_file, forged))
    assert str(v2_file) in str(e.value)
    with pytest.raises(PgolfError, match="unknown codec"):
        pack_sections({"a": np.zeros(3, np.int8)}, {}, codec="rar")
