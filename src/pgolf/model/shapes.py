"""A GPT with its parameters' shapes but not their values, in milliseconds and no memory.

`pgolf presets` and `pgolf plot` need parameter counts and roles, not weights. A real build of
a record-size preset draws 27M initial values and runs a QR per matrix (seconds each on a CPU);
a build under `torch.device("meta")` has to import torch's Python meta kernels and TorchDynamo
for `arange`/`normal_` on meta tensors, about 10 s on the first call of every process. Here the
model is built by its own code, but `torch.empty` (where every nn.Linear / nn.Embedding weight
starts) gives meta tensors and `torch.nn.init` is skipped; the few small tensors made otherwise
(scalars, RoPE frequencies) stay real.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from pgolf.config import ModelConfig
from pgolf.model.gpt import GPT


class _ShapesOnly(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty:
            kwargs["device"] = "meta"
        elif getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]  # the tensor to fill, left as it is
        return func(*args, **kwargs)


def shapes_only_model(cfg: ModelConfig) -> GPT:
    """The GPT of `cfg` with the real parameter names, shapes and roles; values undefined."""
    with _ShapesOnly():
        return GPT(cfg)
