"""Training: determinism, resume after a crash, the compile warm-up undone, DDP over gloo."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pgolf.data.dataset import resolve_dataset
from pgolf.dist import World
from pgolf.errors import PgolfError
from pgolf.runlog import RunLog
from pgolf.train.trainer import Trainer
from tests.conftest import tiny_config

CPU_WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _train(cfg, run_dir, world=CPU_WORLD, resume=False):
    trainer = Trainer(cfg, resolve_dataset(cfg.data), world, run_dir, RunLog(run_dir, False))
    result = trainer.run(resume=resume)
    return trainer, result


def _losses(run_dir):
    return [r["train_loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl"))]


def _logged_train(cfg, run_dir):
    run_dir.mkdir()
    trainer = Trainer(
        cfg, resolve_dataset(cfg.data), CPU_WORLD, run_dir, RunLog(run_dir, True, False)
    )
    trainer.run()
    return trainer


def test_same_seed_same_config_gives_a_bit_identical_loss_curve(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset)
    a = _logged_train(cfg, tmp_path / "a")
    b = _logged_train(cfg, tmp_path / "b")
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    c = _logged_train(tiny_config(tiny_dataset, seed=99), tmp_path / "c")
    assert not torch.equal(next(c.model.parameters()), next(a.model.parameters()))


def test_loss_falls_on_official_fineweb_tokens(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, iterations=40, warmdown_iters=10)
    _logged_train(cfg, tmp_path / "run")
    losses = _losses(tmp_path / "run")
    assert losses[0] > 6.5  # ≈ ln(1024) = 6.93 at init
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0


def test_a_crashed_run_resumes_to_the_same_weights(tiny_dataset, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_dataset, checkpoint_every=5)
    reference, _ = _train(cfg, tmp_path / "reference")

    original_step = Trainer._train_step
    calls = {"n": 0}

    def crashing_step(self, scale):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("simulated kill")
        return original_step(self, scale)

    monkeypatch.setattr(Trainer, "_train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        _train(cfg, tmp_path / "crashed")
    monkeypatch.setattr(Trainer, "_train_step", original_step)
    resumed, result = _train(cfg, tmp_path / "crashed", resume=True)
    assert result.steps == cfg.train.iterations
    for (name, pa), pb in zip(
        reference.model.named_parameters(), resumed.model.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name


def test_compile_warmup_steps_are_fully_undone(tiny_dataset, tmp_path):
    plain, _ = _train(tiny_config(tiny_dataset), tmp_path / "plain")
    warmed, _ = _train(tiny_config(tiny_dataset, warmup_steps=3), tmp_path / "warm")
    for pa, pb in zip(plain.model.parameters(), warmed.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_wallclock_cap_stops_training_early(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, iterations=10_000, max_wallclock_seconds=0.5)
    _, result = _train(cfg, tmp_path / "capped")
    assert result.stopped_by == "wallclock"
    assert 1 <= result.steps < 10_000
    assert result.train_time_ms >= 500


def test_batch_that_does_not_divide_into_sequences_is_refused(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, train_batch_tokens=1000)
    with pytest.raises(PgolfError, match="train_batch_tokens=1000 is not a multiple"):
        _train(cfg, tmp_path / "bad")


# -- two gloo processes ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, data_dir, out_dir, iterations=12):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PGOLF_DEVICE="cpu",
    )
    torch.set_num_threads(1)
    from pgolf.dist import init_world, shutdown

    world = init_world()
    cfg = tiny_config(data_dir, iterations=iterations)
    run_dir = out_dir / "ddp"
    trainer = Trainer(cfg, resolve_dataset(cfg.data), world, run_dir, RunLog(run_dir, False))
    result = trainer.run()
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save({"weights": weights, "loss": result.final_train_loss}, out_dir / f"rank{rank}.pt")
    shutdown(world)


def test_two_gloo_ranks_match_each_other_and_the_single_process_run(tiny_dataset, tmp_path):
    torch.set_num_threads(1)
    single, single_result = _train(tiny_config(tiny_dataset), tmp_path / "single")
    mp.spawn(_ddp_worker, args=(2, _free_port(), tiny_dataset, tmp_path), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][name]), name
        torch.testing.assert_close(w, single.model.state_dict()[name], rtol=1e-4, atol=1e-5)
    # rank-local losses average to the global batch's loss; compare the mean of the two ranks
    ddp_loss = (r0["loss"] + r1["loss"]) / 2
    assert abs(ddp_loss - single_result.final_train_loss) < 1e-4
