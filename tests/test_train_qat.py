"""QAT (SPEC §5.12): the fake-quant branch really runs, compiled or not, and leaves no trace."""

import pytest
import torch
import torch._dynamo

from pgolf.config import ModelConfig
from pgolf.data.dataset import resolve_dataset
from pgolf.dist import World
from pgolf.model.gpt import GPT
from pgolf.model.layers import CastedLinear
from pgolf.runlog import RunLog
from pgolf.train.qat import QAT, fake_quantize_rows
from pgolf.train.trainer import Trainer
from tests.conftest import tiny_config

CPU_WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _tiny_gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2))
    with torch.no_grad():  # zero-init projections would make every output identical
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_fake_quantize_rounds_rows_to_the_quantizers_symmetric_grid():
    w = torch.tensor([[0.31, -0.62, 0.05, 0.0], [1.0, 2.0, -3.0, 0.4], [0.0, 0.0, 0.0, 0.0]])
    q = fake_quantize_rows(w, bits=6)
    scale = w.abs().amax(dim=1, keepdim=True) / 31
    levels = q[:2] / scale[:2]
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-5)
    assert levels.abs().max() <= 31  # ±31 as the int6 quantizer, not upstream's −32
    assert torch.equal(q[2], torch.zeros(4))  # a zero row stays zero (scale floor)
    # Percentile clipping: the outlier is clipped to the row's 50th percentile of |w|.
    clipped = fake_quantize_rows(torch.tensor([[0.1, 0.2, 0.3, 10.0]]), bits=6, clip_percentile=50)
    assert clipped.abs().max() == pytest.approx(0.25, rel=1e-6)


@pytest.mark.parametrize("backend", [None, "eager", "aot_eager"])
def test_qat_changes_the_forward_once_enabled_compiled_or_not(backend):
    model = _tiny_gpt()
    x = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(1))
    keys = list(model.state_dict())
    reference = model(x)
    qat = QAT(model, bits=6, clip_percentile=99.95)
    run = model
    if backend is not None:
        torch._dynamo.reset()
        run = torch.compile(model, backend=backend, fullgraph=True)
    off = run(x)
    assert torch.equal(off, reference)  # switched off, bit-exact with the plain model
    qat.set_active(True)
    # The switch is a tensor the graph reads, so no recompile may be needed to follow it.
    with torch._dynamo.config.patch(error_on_recompile=True):
        on = run(x)
    assert (on - off).abs().max() > 1e-3
    # …and what runs is exactly the fake-quantised model.
    expected = _tiny_gpt()
    with torch.no_grad():
        for m in expected.modules():
            if isinstance(m, CastedLinear):
                m.weight.copy_(fake_quantize_rows(m.weight, 6, 99.95))
    torch.testing.assert_close(on, expected(x), rtol=1e-5, atol=1e-5)
    model.eval()  # the quantizer quantises for real; eval scores the float weights
    torch.testing.assert_close(model(x), reference)
    qat.detach()
    assert list(model.state_dict()) == keys
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_qat_gradient_is_straight_through():
    model = _tiny_gpt()
    x = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(2))
    qat = QAT(model, bits=4)
    qat.set_active(True)
    model.loss(x, x).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # Same loss with the quantised weights as the real parameters: identical gradients (STE).
    expected = _tiny_gpt()
    with torch.no_grad():
        for m in expected.modules():
            if isinstance(m, CastedLinear):
                m.weight.copy_(fake_quantize_rows(m.weight, 4))
    expected.loss(x, x).backward()
    for name, p in expected.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)


def test_late_qat_switches_on_below_the_lr_threshold_and_leaves_the_state_dict_alone(
    tiny_dataset, tmp_path
):
    cfg = tiny_config(tiny_dataset, late_qat_threshold=0.6)
    plain_cfg = tiny_config(tiny_dataset)
    run_dir = tmp_path / "qat"
    trainer = Trainer(cfg, resolve_dataset(cfg.data), CPU_WORLD, run_dir, RunLog(run_dir, True))
    plain = Trainer(
        plain_cfg,
        resolve_dataset(plain_cfg.data),
        CPU_WORLD,
        tmp_path / "p",
        RunLog(tmp_path, False),
    )
    seen = []
    original = trainer._train_step

    def spy(scale, measure=False):
        seen.append((scale, trainer.qat.active))
        return original(scale, measure)

    trainer._train_step = spy
    trainer.run()
    # scales 1 … 1, .75, .5, .25: on from the first step below 0.6, never before.
    assert [on for _, on in seen] == [s < 0.6 for s, _ in seen]
    assert "late QAT on at step 10" in (run_dir / "train.log").read_text()
    assert list(trainer.model.state_dict()) == list(plain.model.state_dict())
    assert trainer.qat is None
    assert all("forward" not in m.__dict__ for m in trainer.model.modules())


@pytest.mark.parametrize("floor", [False, True])
def test_the_trainers_qat_rounds_with_the_quantizers_scale_floor(tiny_dataset, tmp_path, floor):
    cfg = tiny_config(tiny_dataset, qat_enabled=True)
    cfg.quant.scale_floor = floor
    trainer = Trainer(cfg, resolve_dataset(cfg.data), CPU_WORLD, tmp_path, RunLog(tmp_path, False))
    assert trainer.qat.scale_floor is floor
    # A row of tiny weights: floored, the 1/31 grid rounds it to zero; unfloored, it keeps a shape.
    w = torch.full((1, 64), 0.004)
    q = fake_quantize_rows(w, trainer.qat.bits, trainer.qat.clip_percentile, floor)
    assert bool((q == 0).all()) is floor
