"""EMA of the full state (SPEC §5.5), SWA snapshots (§5.6), their blend, and run-relative decay."""

import pytest
import torch
from torch import nn

from pgolf.config import TrainConfig
from pgolf.data.dataset import resolve_dataset
from pgolf.dist import World
from pgolf.runlog import RunLog
from pgolf.train.averaging import (
    WeightAverager,
    decay_for_run,
    ema_window_warning,
    expected_steps,
)
from pgolf.train.config import RECORD_EMA_DECAY, RECORD_EMA_STEPS
from pgolf.train.trainer import Trainer
from tests.conftest import tiny_config

CPU_WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _walk(module: nn.Module, averager: WeightAverager, scales: list[float]) -> list[dict]:
    """Move the weights to a new random point before each update; return every visited state."""
    gen = torch.Generator().manual_seed(0)
    visited = [{k: v.clone() for k, v in module.state_dict().items()}]
    for step, scale in enumerate(scales, start=1):
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        visited.append({k: v.clone() for k, v in module.state_dict().items()})
        averager.update(module, step, scale, elapsed_ms=0.0, max_wallclock_ms=None)
    return visited


def test_ema_after_k_steps_is_the_hand_computed_geometric_average():
    module = nn.Linear(3, 2)
    d, k = 0.8, 5
    averager = WeightAverager(module, TrainConfig(ema_enabled=True, ema_decay=d))
    visited = _walk(module, averager, [1.0] * k)
    for name in module.state_dict():
        # ema_k = d^k·w_0 + Σ_i (1 − d)·d^(k−i)·w_i: the start keeps d^k of the weight.
        expected = d**k * visited[0][name]
        for i in range(1, k + 1):
            expected = expected + (1 - d) * d ** (k - i) * visited[i][name]
        torch.testing.assert_close(averager.ema[name], expected, rtol=1e-6, atol=1e-7)


def test_swa_is_the_mean_of_snapshots_taken_every_k_steps_below_the_scale_threshold():
    module = nn.Linear(3, 2)
    cfg = TrainConfig(swa_enabled=True, swa_every=2, swa_start_frac=0.5)
    averager = WeightAverager(module, cfg)
    scales = [1.0, 1.0, 0.9, 0.4, 0.3, 0.2, 0.1]  # below 0.5 from step 4: snapshots at 4 and 6
    visited = _walk(module, averager, scales)
    assert averager.swa_count == 2
    averaged, what = averager.averaged_state()
    assert what.startswith("SWA")
    for name in module.state_dict():
        torch.testing.assert_close(averaged[name], (visited[4][name] + visited[6][name]) / 2)


@pytest.mark.parametrize("iterations, every", [(400, 5), (4000, 50)])
def test_relative_swa_interval_is_a_share_of_the_run_counted_from_the_last_snapshot(
    iterations, every
):
    module = nn.Linear(3, 2)
    cfg = TrainConfig(swa_enabled=True, swa_every_frac=0.0125, swa_start_frac=0.5)
    cfg.iterations = iterations
    averager = WeightAverager(module, cfg)
    taken = []
    for step in range(1, iterations + 1):
        scale = 1.0 - step / iterations  # below 0.5 from step iterations/2 + 1 on
        before = averager.swa_count
        averager.update(module, step, scale, elapsed_ms=0.0, max_wallclock_ms=None)
        if averager.swa_count > before:
            taken.append(step)
    first = iterations // 2 + 1
    assert taken == list(range(first, iterations + 1, every))  # 40 snapshots either way
    resumed = WeightAverager(module, cfg)
    resumed.load_state_dict(averager.state_dict())
    assert resumed.swa_last_step == taken[-1]


def test_ema_and_swa_together_blend_by_swa_weight():
    module = nn.Linear(3, 2)
    cfg = TrainConfig(
        ema_enabled=True, ema_decay=0.5, swa_enabled=True, swa_every=1, swa_start_frac=2.0
    )
    cfg.swa_weight = 0.25
    averager = WeightAverager(module, cfg)
    _walk(module, averager, [1.0, 1.0, 1.0])
    blend, what = averager.averaged_state()
    assert "0.75·EMA + 0.25·SWA" in what
    swa = averager.swa_mean()
    for name, v in blend.items():
        torch.testing.assert_close(v, 0.75 * averager.ema[name] + 0.25 * swa[name])


def test_swa_without_snapshots_falls_back_with_a_warning():
    module = nn.Linear(3, 2)
    averager = WeightAverager(module, TrainConfig(swa_enabled=True, swa_start_frac=0.1))
    _walk(module, averager, [1.0, 1.0])
    with pytest.warns(UserWarning, match="no snapshot"):
        averaged, what = averager.averaged_state()
    assert averaged is None and what.startswith("raw weights")


def test_relative_horizon_reproduces_the_record_decay_at_the_record_scale():
    assert decay_for_run(RECORD_EMA_DECAY, RECORD_EMA_STEPS, 7000) == 0.997
    # At 400 steps the window shrinks with the run: ≈19 steps, not the record's 333.
    d = decay_for_run(RECORD_EMA_DECAY, RECORD_EMA_STEPS, 400)
    assert 1 / (1 - d) == pytest.approx(400 / 21)
    # Under a wall-clock cap the run length is predicted from the average step time.
    assert expected_steps(100, 10_000.0, 20_000, 600_000.0) == pytest.approx(6000)
    assert expected_steps(100, 10_000.0, 4_000, 600_000.0) == 4000
    assert expected_steps(0, 0.0, 4_000, 600_000.0) == 4000


def test_a_fixed_decay_longer_than_the_run_share_warns():
    msg = ema_window_warning(0.997, 400, 0.25)
    assert msg is not None and "333 steps" in msg and "30.1%" in msg
    assert ema_window_warning(0.997, 7000, 0.25) is None
    assert ema_window_warning(0.9, 400, 0.25) is None


def _run(cfg, run_dir):
    trainer = Trainer(cfg, resolve_dataset(cfg.data), CPU_WORLD, run_dir, RunLog(run_dir, False))
    return trainer, trainer.run()


def test_trainer_loads_the_ema_at_the_end_and_the_decay_follows_the_run(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, ema_enabled=True)
    trainer, result = _run(cfg, tmp_path / "ema")
    assert result.weights == "EMA"
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, trainer.averager.ema[name].to(value.dtype))
    # 12 iterations × 1/21 = a window under one step, floored at 1: decay 0, EMA = last weights.
    assert trainer.averager.last_decay == 0.0


def test_a_long_fixed_decay_warns_in_the_trainer(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, ema_enabled=True, ema_decay=0.99)
    with pytest.warns(UserWarning, match="EMA decay 0.99 averages over ~100 steps"):
        _run(cfg, tmp_path / "warn")


def test_trainer_uses_swa_when_switched_on(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, swa_enabled=True, swa_every=2, swa_start_frac=0.6)
    trainer, result = _run(cfg, tmp_path / "swa")
    # warm-down 4 of 12 steps: scales 1, .75, .5, .25 → below 0.6 at steps 11 and 12; every 2 → 12.
    assert result.weights == "SWA (1 snapshots)"
    swa = trainer.averager.swa_mean()
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, swa[name])
