"""TOP's model (SPEC §5.28, §5.31) against pgolf's, both at 8 layers × 128 (`top_config`).

The record's script runs through the CPU shim with its Triton kernels stubbed (they cannot launch
without a GPU): its fused cross-entropy is off (FUSED_CE_ENABLED=0) and its MLP takes the eager
path (`use_fused=False`), the plain-PyTorch code the record keeps beside each kernel.
- the same weights give the same fp32 logits bit for bit, with the loop off (as training starts)
  and on, through the two-lane decoder, the sparse attention gate and the pre-norm BOS-masked
  SmearGate, and the head reading either lane alone;
- the same weights and batch give the same training loss and the same gradient of every weight;
- pgolf's fused soft-capped cross-entropy gives the plain loss and gradient;
- the `top` preset's model, at this shape, draws the record's initial weights from the same seed,
  every tensor (`model.banked_init` with `banked_init_order = "qkv-first"`); S549's
  layer-by-layer order does not.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pgolf.config import load_preset
from pgolf.errors import PgolfError
from pgolf.model.gpt import GPT
from pgolf.model.layout import resolve_layout
from pgolf.model.loss import softcapped_cross_entropy

from .models import top_config, top_module, top_state_dict
from .official import assert_close


def _random_official(seed: int = 1):
    mod = top_module()
    ref = mod.GPT(mod.args)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            # Random everywhere, the zero-init gates and λ = 1.1 lanes too, so every path counts.
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    for block in ref.blocks:
        block.mlp.use_fused = False
    return mod, ref


def _loaded(final_lane: str = "mean"):
    mod, ref = _random_official()
    ref.parallel_final_lane = final_lane
    ours = GPT(dataclasses.replace(top_config(), parallel_final_lane=final_lane))
    ours.load_state_dict(top_state_dict(mod, ref))
    return mod, ref, ours


def _tokens(seed: int = 2) -> torch.Tensor:
    x = torch.randint(2, 1024, (2, 48), generator=torch.Generator().manual_seed(seed))
    x[0, 0] = x[0, 17] = x[1, 30] = 1  # BOS: the SmearGate must not reach across them
    return x


def test_layout_is_the_records():
    mod = top_module()
    ref = mod.GPT(mod.args)
    layout = resolve_layout(top_config())
    assert layout.looped == (tuple(ref.encoder_indices), tuple(ref.decoder_indices))
    assert layout.num_skip_weights == ref.num_skip_weights == 7
    assert layout.parallel == (6, 7)
    ours = GPT(top_config())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("final_lane", ["mean", "attn", "mlp"])
def test_same_weights_give_the_records_logits(final_lane):
    mod, ref, ours = _loaded(final_lane)
    x = _tokens()
    for looping in (False, True):
        ref.looping_active = looping
        ours.set_recurrence(looping)
        with torch.no_grad():
            want = ref.forward_logits(x)
            assert_close(f"TOP logits, lane {final_lane}, looping {looping}", ours(x), want)


def _preset_at_test_shape():
    """The `top` preset's model at `top_config`'s shape and layer indices (3..5, lanes from 6)."""
    shape = top_config()
    fields = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads")
    fields += ("loop_start", "loop_end", "parallel_residual_start")
    return dataclasses.replace(load_preset("top").model, **{f: getattr(shape, f) for f in fields})


@pytest.mark.parametrize("seed", [0, 1337])
def test_same_seed_gives_the_records_initial_weights(seed):
    mod = top_module()
    torch.manual_seed(seed)
    theirs = top_state_dict(mod, mod.GPT(mod.args))
    cfg = _preset_at_test_shape()
    assert (cfg.banked_init, cfg.banked_init_order) == (True, "qkv-first")
    torch.manual_seed(seed)
    ours = GPT(cfg).state_dict()
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    for name, value in ours.items():
        assert torch.equal(value, theirs[name].reshape(value.shape)), f"initial {name} differs"
    # Not vacuous: S549's order (layer by layer) gives other MLP-ups and later Q/K/V.
    torch.manual_seed(seed)
    layerwise = GPT(dataclasses.replace(cfg, banked_init_order="layer")).state_dict()
    assert not torch.equal(layerwise["blocks.1.attn.c_q.weight"], ours["blocks.1.attn.c_q.weight"])


def test_same_weights_give_the_records_training_loss_and_gradients():
    mod, ref, ours = _loaded()
    ref.looping_active = True
    ours.set_recurrence(True)
    x, y = _tokens(3), _tokens(4)
    ref.train()
    ours.train()
    theirs_loss = ref(x, y)
    ours_loss = ours.loss(x, y)
    assert_close("TOP training loss", ours_loss, theirs_loss.detach())
    theirs_loss.backward()
    ours_loss.backward()
    theirs_grads = top_state_dict(mod, _grads_as_module(ref))
    for name, p in ours.named_parameters():
        assert_close(f"TOP gradient of {name}", p.grad, theirs_grads[name].reshape(p.shape))


def _grads_as_module(model: torch.nn.Module) -> torch.nn.Module:
    """A stand-in whose state_dict() holds the model's gradients, to unbank and rename them."""

    class Grads(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            return {n: p.grad for n, p in model.named_parameters()}

    return Grads()


def test_fused_softcapped_cross_entropy_is_the_plain_loss_and_gradient():
    gen = torch.Generator().manual_seed(5)
    z = (torch.randn(64, 300, generator=gen) * 40).requires_grad_()
    targets = torch.randint(0, 300, (64,), generator=gen)
    weights = torch.rand(64, generator=gen)  # an uneven upstream gradient per row
    fused = softcapped_cross_entropy(z, targets, 30.0)
    (fused * weights).sum().backward()
    grad_fused = z.grad.clone()
    z.grad = None
    plain = F.cross_entropy(30.0 * torch.tanh(z / 30.0), targets, reduction="none")
    (plain * weights).sum().backward()
    assert_close("fused soft-capped CE", fused, plain.detach(), atol=1e-5)
    assert_close("fused soft-capped CE gradient", grad_fused, z.grad, atol=1e-6)
    assert fused.dtype == torch.float32 and plain.max() > 1.0  # capped logits really differ


def test_the_models_fused_loss_trains_and_evaluation_keeps_the_plain_path():
    _, _, plain = _loaded()
    fused = GPT(dataclasses.replace(top_config(), fused_softcap_ce=True))
    fused.load_state_dict(plain.state_dict())
    x, y = _tokens(6), _tokens(7)
    for model in (plain, fused):
        model.train()
        model.loss(x, y).backward()
    assert_close("fused training loss", fused.loss(x, y), plain.loss(x, y).detach(), atol=2e-6)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        assert_close(f"fused-loss gradient of {name}", p.grad, q.grad, atol=1e-6)
    fused.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(fused.loss(x, y, reduction="none"), plain.loss(x, y, reduction="none"))


def test_lanes_need_the_parallel_layers_after_the_loop():
    with pytest.raises(PgolfError, match="parallel layers must run last"):
        resolve_layout(dataclasses.replace(top_config(), parallel_residual_start=4))
    with pytest.raises(PgolfError, match="no parallel layer"):
        resolve_layout(dataclasses.replace(top_config(), parallel_residual_start=10**6))
