"""Orthogonal initialisation of the S287/S1248/S414 family and its successors (SPEC §5.16).

Every linear layer with both dims ≥ 64 that is not zero-init becomes orthogonal (gain 1). The
bigram and value-embedding projections are built zero in every record and then overwritten by
this loop; S414 (names ending in `.proj`) additionally scales them by 1/√(2L), the banked stacks
do not. Below 64 dims the loop skips a layer, so those two projections stay zero there, exactly as
upstream (which leaves a bigram table and projection that are both zero: no gradient reaches
either, a pitfall of small bigram dims). Without this init, pgolf leaves them at PyTorch's default
like every other non-zero-init linear, instead of the dead zero/zero pair.

The banked scripts orthogonalise their banks first, in one of two orders (`banked_order`); each
orthogonal matrix is one draw of the global RNG, so the order decides which weights a seed gives.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from pgolf.errors import PgolfError
from pgolf.model.layers import CastedLinear

MIN_ORTHO_DIM = 64
BANKED_ORDERS = ("layer", "qkv-first")


@torch.no_grad()
def orthogonal_init(
    modules: Iterable[nn.Module],
    num_layers: int,
    aux_projections: list[nn.Module],
    *,
    scale_aux: bool,
) -> None:
    """Re-initialise the linears among `modules`, in that order (each draw follows the last);
    `aux_projections` are the bigram/VE projections."""
    aux = {id(m) for m in aux_projections}
    aux_scale = 1.0 / math.sqrt(2 * num_layers)
    for module in modules:
        if not isinstance(module, CastedLinear) or module.zero_init:
            continue
        rows, cols = module.weight.shape
        if rows >= MIN_ORTHO_DIM and cols >= MIN_ORTHO_DIM:
            if not module.weight.is_meta:  # `pgolf presets` counts parameters on meta
                nn.init.orthogonal_(module.weight, gain=1.0)
            if scale_aux and id(module) in aux:
                module.weight.mul_(aux_scale)
        elif id(module) in aux:
            nn.init.zeros_(module.weight)


def banked_order(blocks: Iterable[nn.Module], order: str) -> list[nn.Module]:
    """The blocks' modules in the order a banked script orthogonalises its banks.

    "layer": block by block, each in construction order (Q, K, V, MLP-up of layer 0, then 1, ...:
    S549's single loop). "qkv-first": the attention of every block, then its MLP (TOP's two loops:
    Q, K, V of every layer before any MLP-up). Zero-init linears draw nothing, so only where the
    MLP-ups fall matters.
    """
    if order not in BANKED_ORDERS:
        raise PgolfError(f"model.banked_init_order={order!r}: use one of {BANKED_ORDERS}")
    blocks = list(blocks)
    if order == "layer":
        return [m for block in blocks for m in block.modules()]
    attn = [m for block in blocks for m in block.attn.modules()]
    seen = {id(m) for m in attn}
    return attn + [m for block in blocks for m in block.modules() if id(m) not in seen]
