"""Parameter roles, set where a parameter is created; optimizers and quantizers dispatch on them.

- `matrix`: 2-D weights inside the blocks (Muon; quantized per row);
- `embedding`: the token embedding (tied: also the output head);
- `head`: an untied output head;
- `scalar`: gains, mixes and other small control tensors (Adam; kept in higher precision).
"""

from __future__ import annotations

import torch
from torch import nn

ROLES = ("matrix", "embedding", "head", "scalar")
_ATTR = "_pgolf_role"


def with_role(param: nn.Parameter, role: str) -> nn.Parameter:
    if role not in ROLES:
        raise ValueError(f"unknown parameter role {role!r}; expected one of {ROLES}")
    setattr(param, _ATTR, role)
    return param


def role_of(param: torch.Tensor) -> str:
    role = getattr(param, _ATTR, None)
    if role is None:
        raise ValueError("parameter has no role; create it through pgolf.model.roles.with_role")
    return role


def params_by_role(module: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Group a module's (name, parameter) pairs by role, every role present as a key."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {r: [] for r in ROLES}
    for name, param in module.named_parameters():
        groups[role_of(param)].append((name, param))
    return groups
