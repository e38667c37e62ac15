"""Incremental decoding: a per-layer KV cache, so that sampling costs one token's forward a step.

`GPT.forward(new_ids, cache)` runs only the new positions and returns their logits, equal (up to
float rounding) to the last positions of a full forward over everything seen so far. What must be
remembered, and why a plain K/V pair is not quite enough:
- Attention keys and values of every earlier position, one pair per block *call* (depth
  recurrence runs a physical block several times on different inputs). Values are stored as
  attended over (VRL-blended), so later steps never need layer 0's old values.
- Keys before RoPE as well: with NTK rescaling (SPEC §5.9) the rotary base depends on the total
  length, so once a sequence outgrows the nominal length every key is rotated afresh at each step,
  exactly as a full re-forward of the prefix would.
- The last few token ids: BigramHash hashes the previous one or two tokens and SmearGate mixes in
  the previous position's embedding, so the embedding stage re-runs on a short look-back window.
- With document-masked attention, the document index of every cached position, so that a BOS
  among the new tokens opens a new document and earlier ones stay masked.
Everything else (XSA, value embeddings, the output gate, U-Net skips, parallel residuals, LN scale,
the head) is per position and needs no memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pgolf.model.layers import Rotary, apply_rotary

# Tokens before the new ones that the embedding stage reads: SmearGate's previous position, whose
# own BigramHash term with the trigram option reaches two tokens further back.
EMBED_LOOKBACK = 3


class LayerCache:
    """Keys and values of one attention call for every position decoded so far."""

    def __init__(self) -> None:
        self.raw_k: Tensor | None = None  # RMS-normed keys before RoPE, [B, Hkv, T, hd]
        self.k: Tensor | None = None  # the same keys rotated with the base in `k_base`
        self.k_base: float | None = None
        self.v: Tensor | None = None  # values attended over, [B, Hkv, T, hd]

    @property
    def length(self) -> int:
        return 0 if self.v is None else self.v.size(-2)

    def extend(self, k: Tensor, v: Tensor, rotary: Rotary) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Append the new positions' un-rotated keys and values.

        Returns (cos, sin) for the new positions, to rotate their queries with, and all keys
        (rotated) and values so far.
        """
        start = self.length
        total = start + k.size(-2)
        cos, sin = rotary(total, k.dtype)
        self.raw_k = k if self.raw_k is None else torch.cat((self.raw_k, k), dim=-2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=-2)
        base = rotary.base_at(total)
        if self.k is None or base != self.k_base:
            # A new NTK base moves every earlier key, as in a re-forward of the whole prefix.
            self.k = apply_rotary(self.raw_k, cos, sin)
            self.k_base = base
        else:
            new = apply_rotary(k, cos[..., start:, :], sin[..., start:, :])
            self.k = torch.cat((self.k, new), dim=-2)
        return cos[..., start:, :], sin[..., start:, :], self.k, self.v


class DecodeCache:
    """Everything `GPT.forward` needs to continue a batch of sequences one chunk at a time."""

    def __init__(self, num_calls: int, looped: bool) -> None:
        self.layers = [LayerCache() for _ in range(num_calls)]
        self.looped = looped  # the layer order the cached keys were made with
        self.ids: Tensor | None = None  # the last EMBED_LOOKBACK tokens seen
        self.doc_ids: Tensor | None = None  # document index of every position, [B, T]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def embed_window(self, new_ids: Tensor) -> Tensor:
        """The new tokens behind up to EMBED_LOOKBACK earlier ones; remembers the tail."""
        window = new_ids if self.ids is None else torch.cat((self.ids, new_ids), dim=1)
        self.ids = window[:, -EMBED_LOOKBACK:]
        return window
