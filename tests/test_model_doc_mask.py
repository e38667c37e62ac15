"""Document-masked attention (`model.doc_masked_attention`, SPEC §5.31).

With every attention switch on (XSA, VRL, value embeddings, the output gate, partial RoPE, depth
recurrence, parallel residuals; TOP's two lanes) and random weights:
- changing a token of document d changes no logit outside d, and changes d's from that token on;
- each document's logits are those of the document run alone from its BOS, the positions before
  a row's first BOS (a window starting mid-document) those of that stretch alone;
- a row holding one document gives the logits of unmasked attention;
- decoding with the KV cache gives the full forward's logits, across BOS tokens;
- the varlen kernel's path (a per-document SDPA standing in for FlashAttention) equals the mask.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from pgolf.model import doc_mask
from pgolf.model.config import ModelConfig
from pgolf.model.doc_mask import cu_seqlens, document_attention, documents
from pgolf.model.gpt import GPT
from tests.parity.models import top_config
from tests.parity.official import _sdpa_varlen

BOS = 1
V = 64
T = 40
# Row 0 starts mid-document (a sliding window) and has back-to-back BOS and a final BOS; row 1
# starts with a BOS.
BOS_AT = ((9, 10, 23, T - 1), (0, 16, 30))

CONFIGS = {
    "all-switches": ModelConfig(
        vocab_size=V,
        num_layers=4,
        model_dim=64,
        num_heads=4,
        num_kv_heads=2,
        rope_dims=8,
        xsa_last_n=-1,
        value_residual=True,
        ve_enabled=True,
        ve_dim=16,
        attn_out_gate=True,
        smear_gate="v2",
        num_loops=1,
        loop_start=1,
        loop_end=2,
        parallel_residual_start=3,
        skip_gates=True,
        doc_masked_attention=True,
    ),
    "top": dataclasses.replace(top_config(), vocab_size=V, doc_masked_attention=True),
}


def _random_gpt(cfg: ModelConfig) -> GPT:
    model = GPT(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _rows() -> torch.Tensor:
    x = torch.randint(2, V, (len(BOS_AT), T), generator=torch.Generator().manual_seed(1))
    for row, places in enumerate(BOS_AT):
        x[row, list(places)] = BOS
    return x


def _spans(row: int) -> list[tuple[int, int]]:
    """[start, end) of each document of a row, the stretch before its first BOS included."""
    bounds = sorted({0, *BOS_AT[row], T})
    return list(itertools.pairwise(bounds))


@pytest.mark.parametrize("name", CONFIGS)
def test_a_token_changes_only_its_own_documents_logits(name):
    model = _random_gpt(CONFIGS[name])
    x = _rows()
    with torch.no_grad():
        base = model(x)
        for row in range(x.size(0)):
            for start, end in _spans(row):
                at = end - 1 if end - start > 1 else start
                if x[row, at] == BOS:
                    continue  # changing a BOS would move the boundary itself
                changed = x.clone()
                changed[row, at] = 2 + (x[row, at] - 1) % (V - 2)
                out = model(changed)
                inside = torch.zeros_like(x, dtype=torch.bool)
                inside[row, start:end] = True
                assert torch.equal(out[~inside], base[~inside]), (name, row, start)
                assert not torch.allclose(out[row, at], base[row, at])
                assert torch.equal(out[row, start:at], base[row, start:at])


@pytest.mark.parametrize("name", CONFIGS)
def test_each_document_scores_as_if_run_alone(name):
    model = _random_gpt(CONFIGS[name])
    x = _rows()
    with torch.no_grad():
        packed = model(x)
        for row in range(x.size(0)):
            for start, end in _spans(row):
                alone = model(x[row : row + 1, start:end])[0]
                torch.testing.assert_close(packed[row, start:end], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_one_document_per_row_is_plain_causal_attention(name):
    masked = _random_gpt(CONFIGS[name])
    plain = _random_gpt(dataclasses.replace(CONFIGS[name], doc_masked_attention=False))
    x = _rows()
    x[x == BOS] = 2
    x[1, 0] = BOS  # a row opened by its BOS and one without any
    with torch.no_grad():
        torch.testing.assert_close(masked(x), plain(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decoding_gives_the_full_forwards_logits(name):
    model = _random_gpt(CONFIGS[name])
    x = _rows()
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        # A chunk, then one token at a time through the BOS tokens, then a chunk across one.
        steps = [(0, 12), *((t, t + 1) for t in range(12, 26)), (26, T)]
        for start, end in steps:
            got = model(x[:, start:end], cache)
            torch.testing.assert_close(got, full[:, start:end], atol=1e-5, rtol=0)


def test_document_indices_count_bos_tokens_and_continue_a_cache():
    x = _rows()
    docs = documents(x, BOS)
    assert docs.q[0, :12].tolist() == [0] * 9 + [1, 2, 2]
    assert docs.q[1, :2].tolist() == [1, 1]
    head = documents(x[:, :20], BOS)
    tail = documents(x[:, 20:], BOS, head.k)
    assert torch.equal(tail.k, docs.k) and torch.equal(tail.q, docs.q[:, 20:])
    assert docs.cu_seqlens is None  # the CPU never takes the varlen kernel


def test_cu_seqlens_cut_every_row_and_every_bos():
    cu, longest = cu_seqlens(documents(_rows(), BOS).q)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 9, 10, 23, 39, 40, 56, 70, 80]
    assert longest == 16


def test_the_varlen_path_equals_the_mask(monkeypatch):
    monkeypatch.setattr(doc_mask, "varlen_kernel", lambda: _sdpa_varlen)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, T, 16, generator=gen).bfloat16()
    k, v = (torch.randn(2, 2, T, 16, generator=gen).bfloat16() for _ in range(2))
    ids = documents(_rows(), BOS).q
    via_mask = document_attention(q, k, v, doc_mask.Documents(ids, ids), gqa=True)
    varlen = doc_mask.Documents(ids, ids, *cu_seqlens(ids))
    via_kernel = document_attention(q, k, v, varlen, gqa=True)
    torch.testing.assert_close(via_kernel, via_mask, atol=1e-2, rtol=0)
