"""Document-masked ("VarLen") attention: no query sees a key across a BOS (SPEC §5.31).

The shards pack documents back to back, each opened by a BOS (SPEC §2.3). TOP cuts its
`flash_attn_varlen_func` segments at every BOS (`_build_cu_seqlens`): a BOS is the first position
of its document and sees nothing of the previous one, and the positions before a row's first BOS
(a training window or a sliding eval window that starts mid-document) form a document of their
own. Here each position carries the index of its document within its row, the running count of
BOS tokens, so a KV cache can continue the count across decoding steps.

Two exact kernels:
- FlashAttention's varlen kernel (`flash_attn_interface`, FA3, else `flash_attn`, FA2) on CUDA in
  half precision, outside `torch.compile`: it computes only the diagonal blocks. Its
  `cu_seqlens` come from the BOS positions read on the host, which a compiled graph of static
  shapes cannot do (TOP builds them in its loader and recompiles per padded length);
- otherwise one SDPA call with a block-diagonal causal mask from the document indices: static
  shapes, so it compiles and serves the KV cache. It is also the faster exact path on the CPU
  where CPU runs train: against one SDPA call per document (one thread, 8 heads × 64, documents
  of ~300 tokens, forward+backward) 0.4–0.6 s vs 1.9–3.0 s for 32 rows of 256, since many small
  calls cost more, above all in the backward, than the masked blocks the mask computes; even
  at 1024 (2.8 vs 2.7 s, 8 rows); slower only from 2048 (4.1 vs 2.1 s, 4 rows).

RoPE keeps each position's index in its row, as TOP's: scores depend only on position offsets, so
a document scores as if run alone from its BOS whenever both lengths give the same RoPE base
(up to float rounding of the angles).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def varlen_kernel() -> Callable | None:
    """FlashAttention's `flash_attn_varlen_func` if one is installed (FA3 first, as TOP)."""
    for module in ("flash_attn_interface", "flash_attn"):
        try:
            return importlib.import_module(module).flash_attn_varlen_func
        except (ImportError, AttributeError):
            continue
    return None


@dataclass(frozen=True)
class Documents:
    """The document of every query and key position; queries are the last `q.size(1)` keys."""

    q: Tensor  # [B, Tq] document index within the row
    k: Tensor  # [B, Tk]
    # For the varlen kernel only: segment bounds over the flattened B·T positions.
    cu_seqlens: Tensor | None = None
    max_seqlen: int = 0


def documents(input_ids: Tensor, bos_id: int, past: Tensor | None = None) -> Documents:
    """Documents of `input_ids` [B, T], continuing `past` (the cached positions' indices)."""
    q = (input_ids == bos_id).cumsum(dim=1)
    if past is not None:
        q = q + past[:, -1:]
        return Documents(q, torch.cat((past, q), dim=1))
    if q.is_cuda and not torch.compiler.is_compiling() and varlen_kernel() is not None:
        return Documents(q, q, *cu_seqlens(q))
    return Documents(q, q)


def cu_seqlens(ids: Tensor) -> tuple[Tensor, int]:
    """(segment bounds over the flattened rows, longest segment): the varlen kernel's input.

    A segment starts at every row start and wherever the document index steps up; reading the
    bounds back to the host is the sync a compiled graph cannot make.
    """
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    bounds = torch.cat((starts.flatten().nonzero().flatten(), ids.new_tensor([ids.numel()])))
    return bounds.to(torch.int32), int(bounds.diff().max())


def document_attention(q: Tensor, k: Tensor, v: Tensor, docs: Documents, *, gqa: bool) -> Tensor:
    """Causal attention within documents; q [B, H, Tq, hd], k and v [B, Hkv, Tk, hd]."""
    if docs.cu_seqlens is not None and q.dtype in _HALF:
        return _varlen_attention(q, k, v, docs)
    if gqa and q.is_cuda:
        # On CUDA the only fused SDPA kernel that takes a mask (memory-efficient) has no GQA in
        # most torch releases; SDPA would fall back to the math kernel, holding all B·H·T² scores.
        group = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        gqa = False
    tq, tk = q.size(-2), k.size(-2)
    causal = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    # Every query sees at least itself, so no row of the mask is empty (no NaN).
    mask = (docs.q[:, None, :, None] == docs.k[:, None, None, :]) & causal
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _varlen_attention(q: Tensor, k: Tensor, v: Tensor, docs: Documents) -> Tensor:
    b, h, t, hd = q.shape

    def packed(x: Tensor) -> Tensor:  # [B, heads, T, hd] → the kernel's [B·T, heads, hd]
        return x.transpose(1, 2).reshape(b * t, x.size(1), hd)

    y = varlen_kernel()(
        packed(q),
        packed(k),
        packed(v),
        cu_seqlens_q=docs.cu_seqlens,
        cu_seqlens_k=docs.cu_seqlens,
        max_seqlen_q=docs.max_seqlen,
        max_seqlen_k=docs.max_seqlen,
        causal=True,
    )
    if isinstance(y, tuple):  # some FA3 builds also return the log-sum-exp
        y = y[0]
    return y.reshape(b, t, h, hd).transpose(1, 2)
