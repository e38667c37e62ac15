"""Calibration Hessians H = Σ xᵀx of every quantised matrix's inputs (SPEC §5.21).

Inputs are caught where the matrix is applied, so nothing depends on how the model is wired:
- every `nn.Linear` (CastedLinear) gets a forward pre-hook on its input;
- the tied embedding doubles as the output head through `F.linear(x, tok_emb.weight)`; a
  TorchFunctionMode sees that call and records its `x` (the final-norm output feeding the logits),
  keyed by the embedding's parameter name. It matches the weight by storage, so it also works if
  a technique applies the tied head more than once.
A module applied several times per forward (depth recurrence, SPEC §5.28) runs its hook each time
and so accumulates all of its inputs, as GPTQ wants.

Each batch's xᵀx is a float32 product, summed over batches in float64 (so long calibrations do
not lose the small eigenvalues GPTQ divides by), and divided by the token count at the end;
GPTQ's damping is relative to mean(diag H), so the normalisation only matters for numerics.
Hessians are per rank unless `all_reduce=True` sums them (and the counts) over the process group
first — the records keep rank 0's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from pgolf.progress import progress_bar

_LINEAR_FUNCS = {F.linear, torch._C._nn.linear}


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.data_ptr() == b.data_ptr()


class _TiedHeadCapture(TorchFunctionMode):
    def __init__(self, collector: HessianCollector, name: str, weight: Tensor):
        super().__init__()
        self.collector, self.name, self.weight = collector, name, weight

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR_FUNCS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is not None and _same_storage(weight, self.weight):
                self.collector.add(self.name, args[0] if args else kwargs["input"])
        return func(*args, **kwargs)


class HessianCollector:
    """Context manager: inside it, forward passes of `model` accumulate input Hessians.

    `names` (parameter names, e.g. "blocks.0.mlp.fc.weight", "tok_emb.weight") limits what is
    captured; by default every linear layer plus the tied embedding when it serves as the head.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str] | None = None,
        tied_embedding: str | None = "tok_emb.weight",
    ):
        self.model = model
        wanted = None if names is None else set(names)
        self.sums: dict[str, Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._linears = {
            f"{mod_name}.weight": mod
            for mod_name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and (wanted is None or f"{mod_name}.weight" in wanted)
        }
        params = dict(model.named_parameters())
        self._tied = None
        lm_head = getattr(model, "lm_head", None)
        if (
            tied_embedding in params
            and lm_head is None
            and (wanted is None or tied_embedding in wanted)
        ):
            self._tied = (tied_embedding, params[tied_embedding])
        self._handles: list = []
        self._mode: _TiedHeadCapture | None = None

    @property
    def names(self) -> list[str]:
        return list(self._linears) + ([self._tied[0]] if self._tied else [])

    def add(self, name: str, x: Tensor) -> None:
        # One batch's product in float32 (float64 matmuls run at a fraction of the speed on GPUs,
        # which matters inside the training budget); the running sum over batches in float64.
        x = x.detach().reshape(-1, x.shape[-1]).float()
        xtx = (x.T @ x).double()
        if name in self.sums:
            self.sums[name] += xtx
            self.tokens[name] += x.shape[0]
        else:
            self.sums[name] = xtx
            self.tokens[name] = x.shape[0]

    def __enter__(self) -> HessianCollector:
        for name, mod in self._linears.items():
            self._handles.append(
                mod.register_forward_pre_hook(lambda _m, args, _n=name: self.add(_n, args[0]))
            )
        if self._tied is not None:
            self._mode = _TiedHeadCapture(self, *self._tied)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None

    def hessians(self, all_reduce: bool = False) -> dict[str, Tensor]:
        """name → H / tokens (float64, on CPU). Layers never reached are absent."""
        out: dict[str, Tensor] = {}
        for name in self.names:
            if name not in self.sums and not all_reduce:
                continue
            h = self.sums.get(name)
            count = torch.tensor([float(self.tokens.get(name, 0))], dtype=torch.float64)
            if all_reduce and dist.is_available() and dist.is_initialized():
                if h is None:  # every rank must join every reduction, even with nothing to add
                    n = self._input_dim(name)
                    h = torch.zeros(n, n, dtype=torch.float64)
                h_red = h.to(_reduce_device(), copy=True)
                dist.all_reduce(h_red, op=dist.ReduceOp.SUM)
                c = count.to(_reduce_device())
                dist.all_reduce(c, op=dist.ReduceOp.SUM)
                h, count = h_red.cpu(), c.cpu()
            if h is None or float(count) == 0:
                continue
            out[name] = (h / float(count)).cpu()
        return out

    def _input_dim(self, name: str) -> int:
        if name in self._linears:
            return self._linears[name].in_features
        return self._tied[1].shape[1]


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    batches: Iterable[Tensor],
    names: Iterable[str] | None = None,
    all_reduce: bool = False,
    progress: bool = False,
    total: int | None = None,
) -> dict[str, Tensor]:
    """Run `model(x)` on each batch of token ids inside a collector; return name → H."""
    was_training = model.training
    model.eval()
    bar = progress_bar(total=total, desc="calibration", enabled=progress, unit=" batch")
    try:
        with HessianCollector(model, names) as collector:
            for x in batches:
                model(x)
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return collector.hessians(all_reduce=all_reduce)
