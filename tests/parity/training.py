"""The official scripts' training set-up at a tiny shape, for the optimizer and averaging tests.

Each script builds its model and optimizers inline in `main()`, which cannot run on a CPU. Here
the very text of those statements is read from the script (the `GPT(...)` call and the block from
the parameter split to the last optimizer) and executed against the script's own classes, so the
routing, learning rates, decays and betas are the script's, not a re-typed copy. S1413 builds
them in its `Optimizers` class, which is called directly.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import textwrap
import types

import torch
from torch import nn

from pgolf.config import RunConfig, load_preset
from pgolf.model.gpt import GPT
from tests.parity import official

# One shape for every script: 4 layers × 128, BigramHash 64×32, VE 32 on layers 2–3, XSA on all
# four, S1413's loop on layers 1..2, sp1024.
TINY_ENV = dict(
    VOCAB_SIZE=1024,
    NUM_LAYERS=4,
    MODEL_DIM=128,
    EMBEDDING_DIM=128,
    NUM_HEADS=4,
    NUM_KV_HEADS=2,
    BIGRAM_VOCAB_SIZE=64,
    BIGRAM_DIM=32,
    VE_DIM=32,
    VE_LAYERS="2,3",
    XSA_LAST_N=4,
    LOOP_START=1,
    LOOP_END=2,
)


def pgolf_config(preset: str) -> RunConfig:
    """The preset with its model shrunk to TINY_ENV's shape."""
    cfg = load_preset(preset)
    m = cfg.model
    m.vocab_size, m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads = 1024, 4, 128, 4, 2
    m.bigram_vocab_size = 64 if m.bigram_vocab_size else 0
    m.bigram_dim = m.ve_dim = 32
    if m.num_loops:
        m.loop_start, m.loop_end = 1, 2
    return cfg


def load_script(name: str, **env) -> types.ModuleType:
    return official.load_official(name, **{**TINY_ENV, **env})


def _main_source(mod: types.ModuleType) -> str:
    return textwrap.dedent(inspect.getsource(mod.main))


def _call(source: str, opening: str) -> str:
    """The text of the call that starts at `opening` (which ends in its open parenthesis)."""
    start = source.index(opening)
    depth = 0
    for end in range(start + len(opening) - 1, len(source)):
        depth += {"(": 1, ")": -1}.get(source[end], 0)
        if depth == 0:
            return source[start : end + 1]
    raise AssertionError(f"unbalanced call {opening!r}")


def official_model(mod: types.ModuleType) -> nn.Module:
    """The script's GPT built by its own main() call, in fp32, random non-zero weights."""
    if hasattr(mod, "Optimizers"):  # S1413
        model = mod.GPT(mod.args)
    else:
        call = _call(_main_source(mod), "GPT(")
        model = eval(call, vars(mod), {"args": mod.args})  # noqa: S307 - the script's own text
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


def _optimizer_block(source: str) -> str:
    """From the parameter split to the statement before main() logs the parameter count."""
    lines = source.splitlines()
    start = next(
        i for i, s in enumerate(lines) if re.match(r" {4}(block_named_params|matrix_params) = ", s)
    )
    stop = next(
        i for i in range(start, len(lines)) if re.match(r" {4}(n_params =|log0\()", lines[i])
    )
    return textwrap.dedent("\n".join(lines[start:stop]))


def official_optimizers(
    mod: types.ModuleType, model: nn.Module
) -> dict[str, torch.optim.Optimizer]:
    """The script's optimizers over `model`, by their names in main() (tok, muon, scalar, head)."""
    if hasattr(mod, "Optimizers"):  # S1413
        built = mod.Optimizers(mod.args, model)
        names = ("tok", "muon", "scalar", "head")
        found = {n: getattr(built, f"optimizer_{n}") for n in names}
        return {n: o for n, o in found.items() if o is not None}
    scope = dict(vars(mod), args=mod.args, base_model=model)
    exec(_optimizer_block(_main_source(mod)), scope)  # noqa: S102 - the script's own text
    return {
        name.removeprefix("optimizer_"): opt
        for name, opt in scope.items()
        if name.startswith("optimizer_") and isinstance(opt, torch.optim.Optimizer)
    }


def unbank(mod: types.ModuleType, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Banked scripts (S549 lineage) keep layer matrices in 3-D banks; pgolf's names per layer."""
    if hasattr(mod, "_unbank_state_dict"):
        return mod._unbank_state_dict(tensors, mod.args.num_layers)
    return dict(tensors)


def rebank(
    mod: types.ModuleType, tensors: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    if hasattr(mod, "_rebank_state_dict"):
        return mod._rebank_state_dict(tensors, mod.args.num_layers, model.state_dict())
    return dict(tensors)


def pgolf_model_like(cfg: RunConfig, mod: types.ModuleType, ref: nn.Module) -> GPT:
    """pgolf's GPT for `cfg` holding the official model's current weights."""
    model = GPT(cfg.model)
    model.load_state_dict(unbank(mod, ref.state_dict()), strict=False)
    return model


@contextlib.contextmanager
def bf16_as_fp32(mod: types.ModuleType):
    """The script's bf16 Muon arithmetic in fp32 (the shim rule for fp32 parity).

    Its Newton–Schulz casts with `.bfloat16()` and its update buffers are allocated with
    `dtype=torch.bfloat16`; pgolf does the same on CUDA and works in fp32 on the CPU.
    """
    proxy = types.ModuleType("torch_fp32")
    proxy.__getattr__ = lambda name: getattr(torch, name)
    proxy.bfloat16 = torch.float32
    saved_torch, saved_cast = mod.torch, torch.Tensor.bfloat16
    mod.torch = proxy
    torch.Tensor.bfloat16 = lambda self, *a, **k: self.to(torch.float32, copy=True)
    try:
        yield
    finally:
        mod.torch = saved_torch
        torch.Tensor.bfloat16 = saved_cast


def _lines_of_main(mod: types.ModuleType) -> list[str]:
    return _main_source(mod).splitlines()


def official_ema_decay(mod: types.ModuleType) -> float:
    """The decay main() uses: hard-coded up to S1060 and in the seeds, EMA_DECAY in S1413."""
    if hasattr(mod, "Optimizers"):
        return mod.args.ema_decay
    found = re.search(r"^ {4}ema_decay = ([0-9.]+)$", _main_source(mod), re.M)
    return float(found.group(1))


def averaging_setup_block(mod: types.ModuleType) -> str:
    """main()'s statements that start the EMA shadow and the SWA sum, before the loop."""
    pattern = re.compile(r" {4}(ema_state|ema_decay|swa_state|swa_count)\b[^=]*= ")
    return "\n".join(line[4:] for line in _lines_of_main(mod) if pattern.match(line))


def averaging_step_block(mod: types.ModuleType) -> str:
    """main()'s statements after each optimizer step: the EMA update, `step += 1`, the SWA snapshot.

    Runs with `step` (before its increment) and `scale` (the step's LR scale) in scope.
    """
    lines = _lines_of_main(mod)
    ema = next(i for i, s in enumerate(lines) if "ema_state[name].mul_(ema_decay)" in s)
    start = max(i for i in range(ema) if lines[i].strip() == "with torch.no_grad():")
    stop = next(i for i in range(ema, len(lines)) if lines[i].strip() == "swa_count += 1")
    return textwrap.dedent("\n".join(lines[start : stop + 1]))


def averaging_final_block(mod: types.ModuleType) -> str:
    """main()'s statements from the end of the loop to loading the averaged weights."""
    lines = _lines_of_main(mod)
    peak = next(i for i, s in enumerate(lines) if "peak memory allocated" in s)
    start = next(i for i in range(peak, len(lines)) if lines[i] == "    )") + 1
    loads = [
        i
        for i in range(start, start + 80)
        if "base_model.load_state_dict(avg_state, strict=True)" in lines[i]
    ]
    return textwrap.dedent("\n".join(lines[start : loads[-1] + 1]))
