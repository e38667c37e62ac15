"""Hessian capture by hooks (SPEC §5.21) and calibration sources that cannot read val (§1.2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pgolf.config import load_preset
from pgolf.data.shards import write_shard
from pgolf.errors import PgolfError
from pgolf.model.gpt import GPT
from pgolf.model.layers import CastedLinear, rms_norm
from pgolf.quant import calibration
from pgolf.quant.hessian import HessianCollector, collect_hessians
from pgolf.train.loader import DistributedTokenLoader


def tiny_gpt(layers: int = 2, dim: int = 32) -> GPT:
    cfg = load_preset("baseline").model
    cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads = layers, dim, 4, 2
    cfg.vocab_size = 64
    torch.manual_seed(0)
    model = GPT(cfg)
    for p in model.parameters():
        if p.ndim == 2:
            nn.init.normal_(p, std=0.1)  # the zero-init projections would hide their inputs
    return model


def xtx(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float32 products, float64 sums


def test_linear_hessian_is_the_mean_of_xtx_over_tokens():
    lin = CastedLinear(8, 4)
    x1, x2 = torch.randn(3, 5, 8), torch.randn(7, 8)
    with HessianCollector(nn.Sequential(lin)) as c:
        lin(x1)
        lin(x2)
    h = c.hessians()["0.weight"]
    assert_close(h, (xtx(x1) + xtx(x2)) / 22)


class Recurrent(nn.Module):
    """One shared layer applied twice, like depth recurrence (SPEC §5.28)."""

    def __init__(self):
        super().__init__()
        self.shared = CastedLinear(6, 6)
        self.out = CastedLinear(6, 3)

    def forward(self, x):
        h1 = torch.tanh(self.shared(x))
        h2 = torch.tanh(self.shared(h1))
        return self.out(h2)


def test_a_layer_called_twice_accumulates_both_inputs():
    model = Recurrent()
    x = torch.randn(4, 10, 6)
    with torch.no_grad():
        h1 = torch.tanh(model.shared(x))
        h2 = torch.tanh(model.shared(h1))
    hs = collect_hessians(model, [x])
    assert_close(hs["shared.weight"], (xtx(x) + xtx(h1)) / 80)
    assert_close(hs["out.weight"], xtx(h2) / 40)


class Recorder(HessianCollector):
    """Keeps the raw inputs instead of summing them, to check *what* was captured."""

    def add(self, name, x):
        self.sums.setdefault(name, []).append(x.detach())


def test_every_linear_and_the_tied_head_are_captured_with_the_right_inputs():
    model = tiny_gpt()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad(), Recorder(model) as rec:
        logits = model(ids)
    linears = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert set(rec.sums) == set(linears) | {"tok_emb.weight"}
    # The tied embedding's "input" is what multiplies it into the logits: the final-norm output.
    (head_input,) = rec.sums["tok_emb.weight"]
    z = head_input @ model.tok_emb.weight.T
    cap = model.logit_softcap
    torch.testing.assert_close(cap * torch.tanh(z / cap), logits)
    torch.testing.assert_close(head_input, rms_norm(head_input))  # it is RMS-normalised
    hs = collect_hessians(model, [ids])
    assert_close(hs["tok_emb.weight"], xtx(head_input) / 32)


def test_names_filter_and_hooks_are_removed_afterwards():
    model = tiny_gpt()
    ids = torch.randint(0, 64, (1, 8))
    hs = collect_hessians(model, [ids], names=["blocks.0.mlp.fc.weight"])
    assert list(hs) == ["blocks.0.mlp.fc.weight"]
    with HessianCollector(model) as c:
        pass
    model(ids)  # outside the context nothing is recorded any more
    assert c.sums == {}


def test_untied_head_is_captured_as_a_linear():
    cfg = load_preset("baseline").model
    cfg.num_layers, cfg.model_dim, cfg.vocab_size, cfg.tie_embeddings = 1, 16, 32, False
    cfg.num_heads, cfg.num_kv_heads = 2, 1
    model = GPT(cfg)
    hs = collect_hessians(model, [torch.randint(0, 32, (1, 8))])
    assert "lm_head.weight" in hs and "tok_emb.weight" not in hs


# --- calibration sources ------------------------------------------------------------------------


@pytest.fixture
def shards(tmp_path):
    import numpy as np

    tokens = np.arange(5000, dtype=np.uint16) % 64
    train = tmp_path / "fineweb_train_000000.bin"
    val = tmp_path / "fineweb_val_000000.bin"
    write_shard(train, tokens)
    write_shard(val, tokens)
    return train, val


def test_validation_shards_are_refused_as_calibration(shards, tmp_path):
    train, val = shards
    with pytest.raises(PgolfError, match="validation data cannot be a calibration source"):
        list(calibration.train_batches([train, val], 1, 256, 64))
    loader = DistributedTokenLoader([val], 0, 1, torch.device("cpu"))
    with pytest.raises(PgolfError, match="validation data"):
        list(calibration.train_batches(loader, 1, 256, 64))
    # A val shard under a train-looking name (copied or linked) is refused by identity too.
    disguised = tmp_path / "sub" / "fineweb_train_000009.bin"
    disguised.parent.mkdir()
    disguised.symlink_to(val)
    with pytest.raises(PgolfError, match="validation data"):
        list(calibration.train_batches([disguised], 1, 256, 64, val_paths=[val]))
    other = tmp_path / "tokens.bin"
    other.write_bytes(train.read_bytes())
    with pytest.raises(PgolfError, match="only training shards"):
        list(calibration.train_batches([other], 1, 256, 64))


def test_train_batches_come_from_the_training_stream(shards):
    train, _ = shards
    batches = list(calibration.train_batches([train], 3, 256, 64))
    assert [tuple(b.shape) for b in batches] == [(4, 64)] * 3
    loader = DistributedTokenLoader([train], 0, 1, torch.device("cpu"))
    loader.next_batch(256, 64, 1)
    continued = next(calibration.train_batches(loader, 1, 256, 64))
    assert torch.equal(continued, batches[1])  # the trainer's loader continues its stream


def test_self_generated_calibration_is_seeded_and_windowed():
    model = tiny_gpt()
    make = lambda seed, ctx=0: list(  # noqa: E731
        calibration.self_generated(
            model, 3, 12, vocab_size=64, seed=seed, batch_size=2, context=ctx
        )
    )
    a, b, c = make(1), make(1), make(2)
    assert [tuple(x.shape) for x in a] == [(2, 12), (1, 12)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert int(torch.cat(a).max()) < 64
    # A window as long as the sequence is the exact full re-forward.
    assert all(torch.equal(x, y) for x, y in zip(a, make(1, ctx=12), strict=True))
    with pytest.raises(PgolfError, match="temperature"):
        list(calibration.self_generated(model, 1, 4, vocab_size=64, temperature=0))


def test_all_reduce_sums_hessians_and_counts_over_ranks(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        lin = CastedLinear(4, 2)
        x = torch.randn(5, 4)
        with HessianCollector(nn.Sequential(lin)) as c:
            lin(x)
        assert_close(c.hessians(all_reduce=True)["0.weight"], xtx(x) / 5)
    finally:
        dist.destroy_process_group()
