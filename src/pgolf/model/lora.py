"""Per-row low-rank adapters on a GPT, attached by hooks (SPEC §5.29 "Later refinements", §5.31).

TOP's phased TTT gives every document of a batch its own LoRA on the projections of every layer
call and on the head. Here the adapters live outside the model: `LoRAAdapters.attached(model)`
registers forward hooks that add `scale · (x Aᵀ) Bᵀ` to the chosen outputs, row b of the batch
through adapter b, and removes them on exit; the GPT itself knows nothing about them and its
weights are never touched. Attachment points, as TOP's `forward_ttt`:
- q, k, v: added to c_q, c_k, c_v, reading their input (the block's normed attention input);
- o: added to the attention's output projection, reading the same normed input (not the heads);
- mlp: added to the MLP's output, reading its normed input;
- head: added to the logits before the soft cap, reading the final normed hidden state.
Under depth recurrence a physical block runs several times per forward and each run ("slot",
counted in execution order) has its own adapters, as TOP sizes them.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.errors import PgolfError

LORA_TARGETS = ("q", "k", "v", "o", "mlp", "head")


def parse_targets(csv: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in csv.split(",") if part.strip())
    unknown = sorted(set(names) - set(LORA_TARGETS))
    if unknown:
        raise PgolfError(f"unknown LoRA targets {unknown}; choose from {LORA_TARGETS}")
    return names


class BatchedLoRA(nn.Module):
    """One rank-r adapter per batch row: A [rows, r, in], B [rows, out, r], output × alpha / r.

    B starts at zero, so a fresh adapter adds nothing. A starts from one uniform draw shared by
    every row (TOP draws one per row from the same law): a document's adaptation then depends on
    its own tokens only, never on the row it happens to land in.
    """

    def __init__(
        self,
        rows: int,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        generator: torch.Generator,
    ):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        a0 = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        self.register_buffer("a0", a0, persistent=False)
        self.A = nn.Parameter(a0.expand(rows, -1, -1).clone())
        self.B = nn.Parameter(torch.zeros(rows, out_features, rank))
        self.scale = alpha / rank
        # The batch rows this forward's inputs belong to (None: all of them, in order).
        self.rows: Tensor | None = None

    @torch.no_grad()
    def reset(self, keep_a: bool = False) -> None:
        """Back to the fresh state; `keep_a` zeroes B only (TOP's TTT_WARM_START_A)."""
        self.B.zero_()
        if not keep_a:
            self.A.copy_(self.a0.expand_as(self.A))

    def forward(self, x: Tensor) -> Tensor:
        a, b = (self.A, self.B) if self.rows is None else (self.A[self.rows], self.B[self.rows])
        return ((x @ a.transpose(1, 2).to(x.dtype)) @ b.transpose(1, 2).to(x.dtype)) * self.scale


class _AdaptedHead(nn.Module):
    """The model's output head plus the head adapter, standing in for `lm_head` while attached."""

    def __init__(self, model: nn.Module, lora: BatchedLoRA):
        super().__init__()
        # Plain references, not submodules: the head's weights stay the model's alone.
        self.__dict__["base"] = model.lm_head
        self.__dict__["embedding"] = model.tok_emb
        self.lora = lora

    def forward(self, x: Tensor) -> Tensor:
        if self.base is not None:
            logits = self.base(x)
        else:  # tied: exactly the GPT's own tied projection
            logits = F.linear(x, self.embedding.weight.to(x.dtype))
        return logits + self.lora(x)


class LoRAAdapters(nn.Module):
    """Adapters for `rows` documents on every layer call of `model`'s active layer order."""

    def __init__(
        self,
        model: nn.Module,
        rows: int,
        rank: int,
        alpha: float,
        targets: tuple[str, ...],
        seed: int = 0,
    ):
        super().__init__()
        if rank < 1 or rows < 1:
            raise PgolfError("LoRA rank and rows must be ≥ 1")
        cfg = model.cfg
        encoder, decoder = model.layout.looped if model.recurrence_active else model.layout.plain
        self.slots = len(encoder) + len(decoder)
        self.targets = targets
        dim, vocab = cfg.model_dim, cfg.vocab_size
        kv_dim = cfg.num_kv_heads * (dim // cfg.num_heads)
        out_dims = {"q": dim, "k": kv_dim, "v": kv_dim, "o": dim, "mlp": dim}
        gen = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleDict(
            {
                t: nn.ModuleList(
                    BatchedLoRA(rows, dim, out_dims[t], rank, alpha, gen) for _ in range(self.slots)
                )
                for t in LORA_TARGETS[:-1]
                if t in targets
            }
        )
        self.head = BatchedLoRA(rows, dim, vocab, rank, alpha, gen) if "head" in targets else None
        self._slot = -1

    def adapters(self) -> list[BatchedLoRA]:
        return [m for m in self.modules() if isinstance(m, BatchedLoRA)]

    def reset(self, keep_a: bool = False) -> None:
        for lora in self.adapters():
            lora.reset(keep_a)

    def use_rows(self, rows: Tensor | None) -> None:
        """The next forwards' batch rows are these documents (indices into the adapters' rows)."""
        for lora in self.adapters():
            lora.rows = rows

    def _add(self, target: str):
        def hook(module, inputs, output):
            delta = self.layers[target][self._slot](inputs[0])
            if isinstance(output, tuple):  # attention returns (output, values)
                return (output[0] + delta, *output[1:])
            return output + delta

        return hook

    def _next_slot(self, module, inputs) -> None:
        self._slot += 1

    def _first_slot(self, module, inputs) -> None:
        self._slot = -1

    @contextlib.contextmanager
    def attached(self, model: nn.Module):
        """`model`'s forwards run with these adapters inside the block; nothing stays behind."""
        handles = [model.register_forward_pre_hook(self._first_slot)]
        points = {"q": "attn.c_q", "k": "attn.c_k", "v": "attn.c_v", "o": "attn", "mlp": "mlp"}
        for block in model.blocks:
            # Attention runs once per block call, before the MLP, on both block paths.
            handles.append(block.attn.register_forward_pre_hook(self._next_slot))
            for target in self.layers:
                point = block.get_submodule(points[target])
                handles.append(point.register_forward_hook(self._add(target)))
        original_head = model.lm_head
        if self.head is not None:
            model.lm_head = _AdaptedHead(model, self.head)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            if self.head is not None and original_head is None:
                del model.lm_head  # unregister the stand-in; the tied model's attribute is None
                model.lm_head = None
            elif self.head is not None:
                model.lm_head = original_head  # back in its own place among the submodules
