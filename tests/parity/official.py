"""Run an official script's own code on the CPU: the shim of `$PGOLF_SHARED/reference/README.md`.

`load_official("s1019", NUM_LAYERS="4", ...)` imports `reference/s1019_train_gpt.py` as a fresh
module, with its `Hyperparameters` reading the given environment, `torch.compile` as the identity,
FlashAttention replaced by SDPA on its (B, T, H, D) layout and, where Triton is not installed, a
stand-in that lets kernels be defined but not launched (TOP's fused CE and MLP). Nothing of the
math is touched; the files stay in the shared folder and are never copied into this repository.
Calls that need CUDA (training loops, `main`) are not run: tests call the script's classes and
functions directly.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import importlib.util
import itertools
import lzma
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pgolf.settings import shared_dir

# Each pgolf preset and the script it reproduces (demo is baseline's architecture at 4 × 128:
# shrunk, the two are the same model).
PRESET_SCRIPT = {
    "baseline": "base",
    "pr414": "s414",
    "pr549": "s549",
    "pr1019": "s1019",
    "pr1060": "s1060",
    "pr1413": "s1413",
    "seed-p639": "p639",
    "seed-p610": "p610",
    "seed-p1004": "p1004",
    "seed-p578": "p578",
    "seed-p1351": "p1351",
}
SCRIPTS = {
    "base": "base_train_gpt.py",
    "s414": "s414_train_gpt.py",
    "s549": "s549_train_gpt.py",
    "s1019": "s1019_train_gpt.py",
    "s1060": "s1060_train_gpt.py",
    "s1413": "s1413_train_gpt.py",
    "p639": "p639_train_gpt.py",
    "p610": "p610_train_gpt.py",
    "p610_gptq": "p610_eval_gptq.py",
    "p610_ttt": "p610_eval_ttt.py",
    "p1004": "p1004_train_gpt.py",
    "p578": "p578_train_gpt.py",
    "p1351": "p1351_train_gpt.py",
    "top": "top_train_gpt.py",
}
_serial = itertools.count()

# S1413 ships as `exec(lzma.decompress(b85decode("..."), FORMAT_RAW, LZMA2))`.
_WRAPPED = re.compile(r'b85decode\("(.*?)"\)', re.S)
# Its code nests double quotes inside two f-strings, which Python < 3.12 cannot parse; only those
# quotes change (a log line and a shard-count message, no arithmetic).
_PRE_312_QUOTES = (
    ('{", ".join(', "{', '.join("),
    ('glob("fineweb_train_*.bin")', "glob('fineweb_train_*.bin')"),
)


def reference_path(name: str) -> Path:
    path = shared_dir() / "reference" / SCRIPTS[name]
    if not path.is_file():
        pytest.fail(f"{path} missing: set PGOLF_SHARED to the shared folder")
    return path


def _wrapped_source(path: Path) -> str | None:
    """The code an lzma + base85 self-extracting script runs, or None for a plain script."""
    found = _WRAPPED.search(path.read_text())
    if found is None:
        return None
    raw = lzma.decompress(
        base64.b85decode(found.group(1)),
        format=lzma.FORMAT_RAW,
        filters=[{"id": lzma.FILTER_LZMA2}],
    ).decode()
    if sys.version_info < (3, 12):
        for old, new in _PRE_312_QUOTES:
            raw = raw.replace(old, new)
    return raw


def _sdpa_bthd(q, k, v, causal=True, **_):
    """FlashAttention's call on (B, T, H, D) tensors, as SDPA (GQA when K/V have fewer heads)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = k.size(1) != q.size(1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return y.transpose(1, 2)


def _sdpa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                 **_):  # fmt: skip
    """The varlen call on packed (N, H, D) tensors: causal attention inside each document."""
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, end in itertools.pairwise(bounds):
        piece = _sdpa_bthd(q[None, start:end], k[None, start:end], v[None, start:end], causal)
        out[start:end] = piece[0]
    return out


def _flash_stub() -> types.ModuleType:
    stub = types.ModuleType("flash_attn_interface")
    stub.flash_attn_func = _sdpa_bthd
    stub.flash_attn_varlen_func = _sdpa_varlen
    return stub


class _BypassedKernel:
    """A `@triton.jit` kernel under the shim: defined, but launching it fails loudly."""

    def __init__(self, fn):
        self.name = fn.__name__

    def __getitem__(self, grid):
        raise RuntimeError(
            f"Triton kernel {self.name} bypassed by the CPU shim: use its plain-PyTorch path "
            "(TOP: FUSED_CE_ENABLED=0, MLP use_fused=False)"
        )


def _triton_stubs() -> dict[str, types.ModuleType]:
    """Just enough of Triton for a script that defines kernels at import to load on the CPU.

    TOP defines its fused softcapped cross-entropy and LeakyReLU² MLP as Triton kernels; both
    have plain-PyTorch paths (FUSED_CE_ENABLED=0; the MLP's outside training or with
    `use_fused=False`), which are the ones the parity tests run.
    """
    triton = types.ModuleType("triton")
    language = types.ModuleType("triton.language")
    tools = types.ModuleType("triton.tools")
    descriptor = types.ModuleType("triton.tools.tensor_descriptor")
    triton.jit = _BypassedKernel
    triton.cdiv = lambda a, b: -(-a // b)
    triton.language, triton.tools, tools.tensor_descriptor = language, tools, descriptor
    language.constexpr = object  # only read as a parameter annotation
    descriptor.TensorDescriptor = type("TensorDescriptor", (), {})
    return {
        "triton": triton,
        "triton.language": language,
        "triton.tools": tools,
        "triton.tools.tensor_descriptor": descriptor,
    }


def _identity_compile(fn=None, **_):
    return fn if fn is not None else (lambda f: f)


@contextlib.contextmanager
def _patched(env: dict[str, str]):
    saved_env = {k: os.environ.get(k) for k in env}
    stubs = {"flash_attn_interface": _flash_stub()}
    if importlib.util.find_spec("triton") is None:
        stubs |= _triton_stubs()
    saved_mods = {name: sys.modules.get(name) for name in stubs}
    saved_compile = torch.compile
    os.environ.update(env)
    sys.modules.update(stubs)
    torch.compile = _identity_compile
    try:
        yield
    finally:
        torch.compile = saved_compile
        for name, saved in saved_mods.items():
            if saved is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_official(name: str, **env) -> types.ModuleType:
    """A fresh module of the official script `name`, its Hyperparameters read under `env`."""
    path = reference_path(name)
    module_name = f"official_{name}_{next(_serial)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    with _patched({k: str(v) for k, v in env.items()}):
        sys.modules[module_name] = module  # dataclasses and pickling look a module up by name
        wrapped = _wrapped_source(path)
        if wrapped is None:
            spec.loader.exec_module(module)
        else:
            exec(compile(wrapped, str(path), "exec"), module.__dict__)
        module.args = module.Hyperparameters() if hasattr(module, "Hyperparameters") else None
    # Functions that call torch.compile at call time (eval loops, TTT) get the identity too.
    module.torch_compile_identity = _identity_compile
    return module


def load_definitions(name: str, names: tuple[str, ...], **env) -> types.ModuleType:
    """Only the imports and the top-level `def`/`class` statements `names` of script `name`,
    executed alone in a fresh module (under the shim, `env` set while they run).

    For scripts whose module-level code cannot run on the CPU. `log` is a no-op unless among
    `names`; `args` is `Hyperparameters()` read under `env` when that class is among them.
    """
    path = reference_path(name)
    source = _wrapped_source(path) or path.read_text()
    tree = ast.parse(source)
    wanted = [
        node
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        or (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names)
    ]
    missing = set(names) - {getattr(node, "name", None) for node in wanted}
    assert not missing, f"{SCRIPTS[name]} defines no {sorted(missing)}"
    module = types.ModuleType(f"official_{name}_definitions_{next(_serial)}")
    module.log = lambda *args, **kwargs: None
    with _patched({k: str(v) for k, v in env.items()}):
        code = compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec")
        exec(code, module.__dict__)  # noqa: S102 - the script's own text
        module.args = module.Hyperparameters() if "Hyperparameters" in names else None
    return module


@contextlib.contextmanager
def no_compile():
    """For calling official functions that compile inside (sliding eval, TTT): identity instead."""
    saved = torch.compile
    torch.compile = _identity_compile
    try:
        yield
    finally:
        torch.compile = saved


@contextlib.contextmanager
def cuda_autocast_on_cpu():
    """The scripts' `torch.autocast(device_type="cuda", ...)` as CPU autocast, for bf16 tests.

    Only the device changes; ops whose autocast dtype differs between the two devices (CPU
    keeps softmax in bf16, CUDA widens it) must be compared under the same autocast on both sides.
    """
    real = torch.autocast

    def on_cpu(device_type, *args, **kwargs):
        return real("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    torch.autocast = on_cpu
    try:
        yield
    finally:
        torch.autocast = real


def assert_close(quantity: str, ours, theirs, atol: float = 0.0, rtol: float = 0.0):
    """Equal within tolerance, or fail naming the quantity and both values."""
    # Python floats and lists become float64: torch's default float32 would round them first.
    ours_t, theirs_t = (
        x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)
        for x in (ours, theirs)
    )
    if ours_t.shape != theirs_t.shape:
        pytest.fail(f"{quantity}: shape pgolf {tuple(ours_t.shape)} vs official "
                    f"{tuple(theirs_t.shape)}")  # fmt: skip
    diff = (ours_t.double() - theirs_t.double()).abs()
    limit = atol + rtol * theirs_t.double().abs()
    if not bool((diff <= limit).all()):
        i = int(torch.argmax(diff - limit))
        flat_o, flat_t = ours_t.reshape(-1), theirs_t.reshape(-1)
        pytest.fail(
            f"{quantity}: pgolf {flat_o[i].item()!r} vs official {flat_t[i].item()!r} at flat "
            f"index {i} (max |diff| {diff.max().item():.3g}, atol {atol}, rtol {rtol})"
        )
