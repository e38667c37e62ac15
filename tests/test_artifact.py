"""The artifact container (no pickle, verified on load) and the baseline int8 export (SPEC §4.8)."""

from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from pgolf.artifact import int8
from pgolf.artifact.container import (
    BFLOAT16,
    CODECS,
    array_to_tensor,
    is_bfloat16,
    pack_artifact,
    read_artifact,
    tensor_to_array,
    unpack_artifact,
    write_artifact,
)
from pgolf.errors import PgolfError

NUMPY_DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "int64"]
NUMPY_DTYPES += ["float16", "float32", "float64"]


def random_array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Arbitrary bit patterns (NaNs, infinities, -0 included) so equality means bit-exact."""
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    target = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * target.itemsize, dtype=np.uint8)
    return raw.view(target).reshape(shape)


def assert_bit_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert a.dtype == b.dtype and is_bfloat16(a.dtype) == is_bfloat16(b.dtype)
    assert a.tobytes() == b.tobytes()


def rewrite_header(data: bytes, edit) -> bytes:
    (length,) = struct.unpack_from("<I", data, 6)
    header = json.loads(data[10 : 10 + length])
    edit(header)
    new = json.dumps(header).encode()
    return data[:6] + struct.pack("<I", len(new)) + new + data[10 + length :]


@pytest.fixture
def artifact_bytes() -> bytes:
    rng = np.random.default_rng(0)
    tensors = {"w": random_array(rng, "float32", (16, 8)), "b": random_array(rng, "int8", (5,))}
    return pack_artifact(tensors, {"note": "x"}, codec="zlib")


# --- container: round trips ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [*NUMPY_DTYPES, "bfloat16"])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (4, 5), (2, 3, 4)])
def test_round_trip_is_bit_exact_for_every_dtype_and_shape(dtype, shape):
    arr = random_array(np.random.default_rng(1), dtype, shape)
    tensors, meta = unpack_artifact(pack_artifact({"t": arr}, {"k": [1, 2]}))
    assert meta == {"k": [1, 2]}
    assert_bit_equal(tensors["t"], arr)
    assert tensors["t"].flags.writeable and tensors["t"].flags.c_contiguous


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_round_trip_with_every_codec(codec):
    rng = np.random.default_rng(2)
    tensors = {f"t{i}": random_array(rng, dt, (3, i + 1)) for i, dt in enumerate(NUMPY_DTYPES)}
    data = pack_artifact(tensors, {"codec": codec}, codec=codec)
    assert data == pack_artifact(tensors, {"codec": codec}, codec=codec)  # deterministic
    out, meta = unpack_artifact(data)
    assert list(out) == list(tensors) and meta == {"codec": codec}
    for name, arr in tensors.items():
        assert_bit_equal(out[name], arr)


def test_round_trip_property_over_random_shapes_and_dtypes():
    rng = np.random.default_rng(3)
    names = [*NUMPY_DTYPES, "bfloat16"]
    for case in range(40):
        tensors = {}
        for i in range(int(rng.integers(0, 6))):
            shape = tuple(int(d) for d in rng.integers(0, 6, size=int(rng.integers(0, 4))))
            tensors[f"layer.{case}.{i}"] = random_array(rng, names[rng.integers(len(names))], shape)
        codec = ["none", "zlib", "lzma"][case % 3]
        out, _ = unpack_artifact(pack_artifact(tensors, {}, codec=codec))
        assert list(out) == list(tensors)
        for name, arr in tensors.items():
            assert_bit_equal(out[name], arr)


def test_big_endian_input_is_stored_little_endian():
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    out, _ = unpack_artifact(pack_artifact({"a": arr}, {}))
    np.testing.assert_array_equal(out["a"], arr)
    assert out["a"].dtype == np.dtype("int32")


def test_bfloat16_tensors_convert_both_ways_bit_exactly():
    t = torch.randn(5, 7).to(torch.bfloat16)
    arr = tensor_to_array(t)
    assert is_bfloat16(arr.dtype)
    out, _ = unpack_artifact(pack_artifact({"t": arr}, {}))
    back = array_to_tensor(out["t"])
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), t.view(torch.int16))


def test_unsupported_dtype_is_refused_when_packing():
    with pytest.raises(TypeError, match="unsupported dtype"):
        pack_artifact({"c": np.zeros(3, dtype=np.complex64)}, {})


# --- container: corruption and bad input -----------------------------------------------------


def load_file(tmp_path, data: bytes):
    path = tmp_path / "model.pgolf"
    path.write_bytes(data)
    return path, lambda: read_artifact(path)


def test_flipped_payload_byte_fails_the_checksum(tmp_path, artifact_bytes):
    data = bytearray(artifact_bytes)
    data[-3] ^= 0x40
    path, load = load_file(tmp_path, bytes(data))
    with pytest.raises(PgolfError, match="checksum") as e:
        load()
    assert str(path) in str(e.value)


@pytest.mark.parametrize("keep", [0, 3, 8, 40, -1])
def test_truncated_file_is_reported(tmp_path, artifact_bytes, keep):
    path, load = load_file(tmp_path, artifact_bytes[:keep])
    with pytest.raises(PgolfError, match="truncated") as e:
        load()
    assert str(path) in str(e.value)


def test_wrong_magic_is_reported(tmp_path, artifact_bytes):
    path, load = load_file(tmp_path, b"PK\x03\x04" + artifact_bytes[4:])
    with pytest.raises(PgolfError, match="magic") as e:
        load()
    assert str(path) in str(e.value)


def test_unsupported_version_is_reported(tmp_path, artifact_bytes):
    path, load = load_file(tmp_path, artifact_bytes[:5] + b"\x09" + artifact_bytes[6:])
    with pytest.raises(PgolfError, match="version 9") as e:
        load()
    assert str(path) in str(e.value)


def test_unknown_codec_in_header_is_reported(tmp_path, artifact_bytes):
    data = rewrite_header(artifact_bytes, lambda h: h.update(codec="lrzip"))
    path, load = load_file(tmp_path, data)
    with pytest.raises(PgolfError, match="unknown codec 'lrzip'") as e:
        load()
    assert str(path) in str(e.value)


def test_unknown_codec_is_refused_when_packing():
    with pytest.raises(PgolfError, match="unknown codec"):
        pack_artifact({}, {}, codec="rar")


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h["tensors"][0].update(shape=[16, 9]),
        lambda h: h["tensors"][0].update(dtype="float64"),
        lambda h: h["tensors"][1].update(offset=0),
        lambda h: h.update(payload_nbytes=h["payload_nbytes"] + 1),
        lambda h: h["tensors"].pop(),
        lambda h: h["tensors"].append(dict(h["tensors"][1])),
    ],
)
def test_header_that_disagrees_with_payload_is_reported(tmp_path, artifact_bytes, edit):
    path, load = load_file(tmp_path, rewrite_header(artifact_bytes, edit))
    with pytest.raises(PgolfError) as e:
        load()
    assert str(path) in str(e.value)


def test_garbage_header_and_trailing_bytes_are_reported(tmp_path, artifact_bytes):
    for data in (
        artifact_bytes[:10] + b"\xff" * (len(artifact_bytes) - 10),
        artifact_bytes + b"extra",
    ):
        path, load = load_file(tmp_path, data)
        with pytest.raises(PgolfError) as e:
            load()
        assert str(path) in str(e.value)


def test_missing_file_is_a_pgolf_error(tmp_path):
    with pytest.raises(PgolfError, match="not found"):
        read_artifact(tmp_path / "nope.pgolf")


def test_loading_never_unpickles(tmp_path, monkeypatch):
    state = {"w": torch.randn(300, 300), "attn_scale": torch.ones(8), "step": torch.tensor(3)}
    path = tmp_path / "m.pgolf"
    write_artifact(path, *int8.quantize_state_dict_int8(state), codec="zlib")

    def forbidden(*args, **kwargs):
        raise AssertionError("the artifact loader must not unpickle")

    for module, attr in [(pickle, "loads"), (pickle, "load"), (torch, "load"), (np, "load")]:
        monkeypatch.setattr(module, attr, forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    restored = int8.dequantize_state_dict_int8(*read_artifact(path))
    assert set(restored) == set(state)


# --- container: atomic writes ----------------------------------------------------------------


def test_write_is_atomic_and_returns_the_file_size(tmp_path):
    path = tmp_path / "out" / "model.pgolf"
    n = write_artifact(path, {"a": np.arange(10, dtype=np.int16)}, {"x": 1}, codec="lzma")
    assert n == path.stat().st_size
    assert os.listdir(path.parent) == ["model.pgolf"]


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    fresh = tmp_path / "fresh.pgolf"
    with pytest.raises(OSError, match="disk full"):
        write_artifact(fresh, {"a": np.zeros(4, np.int8)}, {})
    assert os.listdir(tmp_path) == []

    old = tmp_path / "old.pgolf"
    old.write_bytes(b"previous")
    with pytest.raises(OSError, match="disk full"):
        write_artifact(old, {"a": np.zeros(4, np.int8)}, {})
    assert old.read_bytes() == b"previous" and os.listdir(tmp_path) == ["old.pgolf"]


# --- int8 baseline export --------------------------------------------------------------------


def reference_row_clip(w: torch.Tensor) -> torch.Tensor:
    return torch.quantile(w.float().abs(), int8.CLIP_QUANTILE, dim=1)


def test_int8_rows_round_to_nearest_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    # Rows with a spread of magnitudes so some scales sit above the 1/127 floor and some at it.
    w = torch.randn(96, 1024, generator=g) * torch.logspace(-2, 1.5, 96)[:, None]
    arrays, meta = int8.quantize_state_dict_int8({"blocks.0.mlp.fc.weight": w})
    assert meta["tensors"]["blocks.0.mlp.fc.weight"]["scheme"] == "int8_per_row"
    q = torch.from_numpy(arrays["blocks.0.mlp.fc.weight"])
    scale16 = torch.from_numpy(arrays["blocks.0.mlp.fc.weight" + int8.SCALE_SUFFIX])
    assert q.dtype == torch.int8 and scale16.dtype == torch.float16 and q.abs().max() <= 127

    clip = reference_row_clip(w)
    scale = torch.clamp(clip / 127, min=1 / 127)
    assert torch.equal(scale16, scale.half())
    unclipped = w.abs() <= clip[:, None]
    err = (q.float() * scale[:, None] - w).abs()
    bound = (scale[:, None] / 2) * (1 + 1e-5)
    assert bool((err <= bound)[unclipped].all())
    assert bool((scale > 1 / 127).any()) and bool((scale == torch.tensor(1 / 127)).any())


def test_int8_floor_of_one_over_127_applies_to_tiny_rows():
    w = torch.full((4, 20_000), 1e-4)
    w[1] = -3e-3
    arrays, _ = int8.quantize_state_dict_int8({"w": w})
    scale = torch.from_numpy(arrays["w" + int8.SCALE_SUFFIX])
    assert torch.equal(scale, torch.full((4,), 1 / 127).half())
    q = torch.from_numpy(arrays["w"])
    assert torch.equal(q, torch.round(w * 127).to(torch.int8))  # 0 here: the floor swamps them


def test_int8_control_tensors_stay_float32_exactly():
    g = torch.Generator().manual_seed(1)
    state = {f"blocks.0.{name}": torch.randn(512, generator=g) for name in int8.CONTROL_PATTERNS}
    state["skip_weights"] = torch.randn(4, 512, generator=g).to(torch.bfloat16)
    arrays, meta = int8.quantize_state_dict_int8(state)
    restored = int8.dequantize_state_dict_int8(arrays, meta)
    for name, t in state.items():
        assert arrays[name].dtype == np.float32
        assert torch.equal(torch.from_numpy(arrays[name]), t.float())
        assert restored[name].dtype == t.dtype and torch.equal(restored[name], t)


def test_int8_small_float_tensors_are_stored_float16_and_restored_to_their_dtype():
    state = {
        "norm.weight": torch.randn(512),
        "bias16": torch.randn(64).half(),
        "emb.bf16": torch.randn(256, 256).to(torch.bfloat16),  # exactly 65,536 elements
        "big.float64": torch.randn(10, 10, dtype=torch.float64),
    }
    arrays, meta = int8.quantize_state_dict_int8(state)
    restored = int8.dequantize_state_dict_int8(arrays, meta)
    for name, t in state.items():
        assert meta["tensors"][name]["scheme"] == "float"
        assert arrays[name].dtype == np.float16
        assert restored[name].dtype == t.dtype
        assert torch.equal(restored[name], t.half().to(t.dtype))


def test_int8_non_float_tensors_are_stored_unchanged():
    state = {"step": torch.tensor(7), "mask": torch.rand(70_000) > 0.5, "ids": torch.arange(9)}
    arrays, meta = int8.quantize_state_dict_int8(state)
    restored = int8.dequantize_state_dict_int8(arrays, meta)
    for name, t in state.items():
        assert meta["tensors"][name]["scheme"] == "raw"
        assert restored[name].dtype == t.dtype and torch.equal(restored[name], t)


def test_int8_other_large_floats_use_one_scale_per_tensor():
    g = torch.Generator().manual_seed(2)
    state = {
        "vec": torch.randn(70_000, generator=g) * 3,
        "cube": torch.randn(8, 100, 100, generator=g).to(torch.bfloat16),
        "zeros": torch.zeros(2, 40_000, 1),
    }
    arrays, meta = int8.quantize_state_dict_int8(state)
    for name, t in state.items():
        assert meta["tensors"][name]["scheme"] == "int8_per_tensor"
        scale = arrays[name + int8.SCALE_SUFFIX]
        assert scale.dtype == np.float32 and scale.shape == ()
        clip = float(torch.quantile(t.float().abs().flatten(), int8.CLIP_QUANTILE))
        assert float(scale) == np.float32(clip / 127 if clip > 0 else 1.0)
    restored = int8.dequantize_state_dict_int8(arrays, meta)
    assert restored["cube"].dtype == torch.bfloat16 and restored["zeros"].abs().max() == 0
    vec, scale = state["vec"], float(arrays["vec" + int8.SCALE_SUFFIX])
    unclipped = vec.abs() <= float(torch.quantile(vec.abs(), int8.CLIP_QUANTILE))
    err = (restored["vec"] - vec).abs()[unclipped]
    assert float(err.max()) <= scale / 2 * (1 + 1e-5)


def test_int8_state_dict_round_trip_through_the_container(tmp_path):
    g = torch.Generator().manual_seed(3)
    state = {
        "tok_emb.weight": torch.randn(1024, 128, generator=g).to(torch.bfloat16),
        "blocks.0.attn.c_q.weight": torch.randn(128, 1024, generator=g) * 0.05,
        "blocks.0.attn_scale": torch.rand(128, generator=g),
        "blocks.0.ln.weight": torch.randn(128, generator=g),
        "step": torch.tensor(5),
    }
    path = tmp_path / "final_model.int8.pgolf"
    size = write_artifact(path, *int8.quantize_state_dict_int8(state), codec="zlib")
    assert size == path.stat().st_size
    restored = int8.dequantize_state_dict_int8(*read_artifact(path))
    assert list(restored) == list(state)
    for name, t in state.items():
        assert restored[name].dtype == t.dtype and restored[name].shape == t.shape
    # 1/127 floor: every row here has clip < 1, so the step is 1/127 and the error at most half.
    err = (restored["blocks.0.attn.c_q.weight"] - state["blocks.0.attn.c_q.weight"]).abs()
    assert float(err.max()) <= 0.5 / 127 * 1.01


def test_dequantize_rejects_foreign_or_inconsistent_meta():
    arrays, meta = int8.quantize_state_dict_int8({"w": torch.randn(300, 300)})
    with pytest.raises(PgolfError, match="format"):
        int8.dequantize_state_dict_int8(arrays, {"format": "int8_clean_per_row_v1"})
    del arrays["w" + int8.SCALE_SUFFIX]
    with pytest.raises(PgolfError, match="no scales"):
        int8.dequantize_state_dict_int8(arrays, meta)
    bad = {"format": int8.FORMAT, "tensors": {"w": {"dtype": "os.system", "scheme": "raw"}}}
    with pytest.raises(PgolfError, match="invalid entry"):
        int8.dequantize_state_dict_int8(arrays, bad)


# --- int8: tensors past torch.quantile's 2**24-element limit ---------------------------------


def test_chunked_row_quantile_matches_torch_quantile_exactly():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 513, generator=g).abs()
    expected = torch.quantile(x, int8.CLIP_QUANTILE, dim=1)
    for limit in (513, 1000, 513 * 5, 100 * 513):
        assert torch.equal(int8.row_quantile(x, int8.CLIP_QUANTILE, max_numel=limit), expected)
    # Rows longer than the limit take the selection path; it must agree bit for bit too.
    for q in (int8.CLIP_QUANTILE, 0.5, 0.0, 1.0, 0.3):
        got = int8.row_quantile(x, q, max_numel=100)
        assert torch.equal(got, torch.quantile(x, q, dim=1))


def test_tensor_larger_than_torch_quantile_limit_quantizes():
    n = int8.QUANTILE_MAX_NUMEL + 1000
    w = torch.randn(n, generator=torch.Generator().manual_seed(5))
    w[123] = 50.0  # one outlier, clipped away by the 99.99984th percentile
    arrays, meta = int8.quantize_state_dict_int8({"huge": w})
    assert meta["tensors"]["huge"]["scheme"] == "int8_per_tensor"
    scale = float(arrays["huge" + int8.SCALE_SUFFIX])
    assert 3.0 / 127 < scale < 7.0 / 127
    restored = int8.dequantize_state_dict_int8(arrays, meta)["huge"]
    assert restored[123] == 127 * np.float32(scale)
