"""TOP's VarLen attention (SPEC §5.31) against pgolf's `model.doc_masked_attention`.

TOP hands `flash_attn_varlen_func` segment bounds cut at every BOS (`_build_cu_seqlens`, from its
loader in training and from each batch in evaluation); the CPU shim runs that call as causal SDPA
per segment. On the 8 × 128 model of `top_config`, rows that start mid-document, with back-to-back
BOS tokens and a BOS at the end:
- pgolf's segment bounds are the record's (less its padding to a multiple of 64);
- the same weights give the record's logits row by row, loop off and on, and its training loss.
The record packs a whole batch into one row and also cuts documents longer than the sequence
length every `max_doc_len` tokens; on a row of that length the cut never falls, so each row here
is one of its packed segments' worth of context.
"""

from __future__ import annotations

import dataclasses

import torch

from pgolf.model.doc_mask import cu_seqlens, documents
from pgolf.model.gpt import GPT

from .models import top_config, top_state_dict
from .official import assert_close
from .test_top_model import _random_official

T = 48
BOS = 1
TOL = 1e-6  # per-segment SDPA against one masked SDPA: the same sums, blocked differently


def _tokens(seed: int) -> torch.Tensor:
    x = torch.randint(2, 1024, (3, T), generator=torch.Generator().manual_seed(seed))
    x[0, [11, 12, 30]] = BOS  # mid-document start, back-to-back BOS
    x[1, [0, 20, T - 1]] = BOS  # opened by a BOS, one at the very end
    return x  # row 2: a single stretch of one document


def _records_bounds(mod, row: torch.Tensor) -> tuple[torch.Tensor, int]:
    bos = (row == BOS).nonzero().flatten().tolist()
    return mod._build_cu_seqlens(bos, row.numel(), row.device, row.numel(), 64)


def _loaded():
    mod, ref = _random_official()
    ours = GPT(dataclasses.replace(top_config(), doc_masked_attention=True))
    ours.load_state_dict(top_state_dict(mod, ref))
    return mod, ref, ours


def test_segment_bounds_are_the_records():
    mod, _ = _random_official()
    for row in _tokens(2):
        theirs, longest = _records_bounds(mod, row)
        ours, our_longest = cu_seqlens(documents(row[None], BOS).q)
        n = ours.numel()
        assert torch.equal(ours, theirs[:n]) and bool((theirs[n:] == T).all())
        assert our_longest == longest


def test_same_weights_give_the_records_varlen_logits():
    mod, ref, ours = _loaded()
    x = _tokens(2)
    for looping in (False, True):
        ref.looping_active = looping
        ours.set_recurrence(looping)
        with torch.no_grad():
            got = ours(x)
            for r in range(x.size(0)):
                cu, longest = _records_bounds(mod, x[r])
                want = ref.forward_logits(x[r : r + 1], cu_seqlens=cu, max_seqlen=longest)
                assert_close(f"VarLen logits, row {r}, loop {looping}", got[r : r + 1], want, TOL)


def test_same_weights_give_the_records_varlen_training_loss():
    mod, ref, ours = _loaded()
    ref.looping_active = True
    ours.set_recurrence(True)
    ref.train()
    ours.train()
    x, y = _tokens(3), _tokens(4)
    with torch.no_grad():
        for r in range(x.size(0)):
            cu, _ = _records_bounds(mod, x[r])
            # The record's training call passes its sequence length as max_seqlen.
            want = ref(x[r : r + 1], y[r : r + 1], cu_seqlens=cu, max_seqlen=T)
            got = ours.loss(x[r : r + 1], y[r : r + 1])
            assert_close(f"VarLen training loss, row {r}", got, want, TOL)
