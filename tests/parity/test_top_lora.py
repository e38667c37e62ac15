"""TOP's LoRA TTT forward (`GPT.forward_ttt`, `BatchedTTTLoRA`) against pgolf's hooked adapters.

The same model weights (8 layers × 128, `top_config`, loop on: 14 layer calls, so 14 adapter
slots) and the same adapter state, random A and B on every target (q, k, v, o, MLP, head) and
a different one per batch row, give the record's per-token losses and the same gradient of every
adapter tensor for TOP's chunk loss (a sum of per-document chunk means), which is all its
per-chunk Adam step reads: both sides then step with torch's AdamW.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pgolf.model.lora import LORA_TARGETS, LoRAAdapters

from .official import assert_close
from .test_top_model import _loaded, _tokens

RANK = 4
CHUNK = 16


def _pairs(theirs, ours: LoRAAdapters):
    """(record adapter, pgolf adapter) for every target and slot."""
    lists = {"q": "q_loras", "k": "k_loras", "v": "v_loras", "o": "o_loras", "mlp": "mlp_loras"}
    for target, name in lists.items():
        yield from zip(getattr(theirs, name), ours.layers[target], strict=True)
    yield theirs.lm_head_lora, ours.head


def _same_adapters():
    mod, ref, model = _loaded()
    ref.looping_active = True
    model.set_recurrence(True)
    theirs = mod.BatchedTTTLoRA(2, ref, RANK)
    alpha = mod.BatchedLinearLoRA._ALPHA
    ours = LoRAAdapters(model, 2, RANK, alpha, LORA_TARGETS)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for a, b in _pairs(theirs, ours):
            a.A.copy_(torch.randn(a.A.shape, generator=gen) * 0.1)
            a.B.copy_(torch.randn(a.B.shape, generator=gen) * 0.01)
            b.A.copy_(a.A)
            b.B.copy_(a.B)
    assert ours.slots == len(theirs.q_loras) == 14
    return ref, model, theirs, ours


def test_same_adapters_give_the_records_losses_and_adapter_gradients():
    ref, model, theirs, ours = _same_adapters()
    x, y = _tokens(3), _tokens(4)
    want = ref.forward_ttt(x, y, lora=theirs)
    with ours.attached(model):
        logits = model(x)
    got = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
    got = got.view_as(want)
    assert_close("TOP forward_ttt losses", got, want.detach(), atol=2e-6)
    # Not vacuous: the adapters move the losses.
    with torch.no_grad():
        plain = F.cross_entropy(model(x).reshape(-1, 1024), y.reshape(-1), reduction="none")
    assert (plain.view_as(want) - want).abs().max() > 1e-2
    # TOP's training loss for chunk 1 of each row: the sum of the rows' chunk means.
    want[:, CHUNK : 2 * CHUNK].mean(dim=-1).sum().backward()
    got[:, CHUNK : 2 * CHUNK].mean(dim=-1).sum().backward()
    for i, (a, b) in enumerate(_pairs(theirs, ours)):
        assert_close(f"adapter {i} grad A", b.A.grad, a.A.grad, atol=1e-6, rtol=1e-4)
        assert_close(f"adapter {i} grad B", b.B.grad, a.B.grad, atol=1e-6, rtol=1e-4)
