"""pgolf's own safetensors writer and reader, checked against the `safetensors` package."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from pgolf.errors import PgolfError
from pgolf.safetensors_io import DTYPES, load_safetensors, safetensors_bytes, save_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {f"t.{dtype}": (torch.randn(3, 5, generator=g) * 50).to(dtype) for dtype in DTYPES}
    out["scalar"] = torch.tensor(1.5)
    out["empty"] = torch.zeros(0, 4)
    out["strided"] = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def test_the_safetensors_package_reads_what_pgolf_writes_and_the_other_way(tmp_path):
    tensors = _tensors()
    save_safetensors(tmp_path / "ours.safetensors", tensors)
    _assert_same(load_file(tmp_path / "ours.safetensors"), tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "theirs.safetensors")
    _assert_same(load_safetensors(tmp_path / "theirs.safetensors"), tensors)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:5],  # shorter than the length field
        lambda b: (10**9).to_bytes(8, "little") + b[8:],  # header longer than the file
        lambda b: b[:-1],  # the last tensor cut short
        lambda b: b + b"\0",  # bytes after the last tensor
        lambda b: b[:8] + b"[" + b[9:],  # broken JSON
    ],
)
def test_a_damaged_weights_file_is_an_error_naming_it(damage, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(damage(safetensors_bytes({"w": torch.ones(4), "b": torch.zeros(2)})))
    with pytest.raises(PgolfError, match=r"model\.safetensors: not a valid safetensors file"):
        load_safetensors(path)
