"""Training: determinism, resume after a crash, the compile warm-up undone, DDP over gloo."""

import json
import math

import pytest
import torch
import torch.multiprocessing as mp

from pgolf.data.dataset import resolve_dataset
from pgolf.dist import World
from pgolf.errors import PgolfError
from pgolf.runlog import RunLog
from pgolf.train.clock import BudgetClock
from pgolf.train.trainer import Trainer
from tests.conftest import free_port, join_cpu_world, tiny_config

CPU_WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _train(cfg, run_dir, world=CPU_WORLD, resume=False):
    trainer = Trainer(cfg, resolve_dataset(cfg.data), world, run_dir, RunLog(run_dir, False))
    result = trainer.run(resume=resume)
    return trainer, result


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return [r["train_loss"] for r in _records(run_dir) if "train_loss" in r]


def _logged_train(cfg, run_dir):
    run_dir.mkdir()
    trainer = Trainer(
        cfg, resolve_dataset(cfg.data), CPU_WORLD, run_dir, RunLog(run_dir, True, False)
    )
    trainer.run()
    return trainer


def _assert_same_parameters(a, b):
    """Bit-identical parameters, in the same order; a difference names the parameter."""
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def _kill_at_call(monkeypatch, at_call, run):
    """`run()` with Trainer._train_step raising KeyboardInterrupt (a killed process) on its
    `at_call`-th call, then the real step back in place for the resume."""
    original_step, calls = Trainer._train_step, {"n": 0}

    def crashing_step(self, scale, measure=False):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt("simulated kill")
        return original_step(self, scale, measure)

    monkeypatch.setattr(Trainer, "_train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(Trainer, "_train_step", original_step)


def test_same_seed_same_config_gives_a_bit_identical_loss_curve(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset)
    a = _logged_train(cfg, tmp_path / "a")
    b = _logged_train(cfg, tmp_path / "b")
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    _assert_same_parameters(a.model, b.model)
    c = _logged_train(tiny_config(tiny_dataset, seed=99), tmp_path / "c")
    assert not torch.equal(next(c.model.parameters()), next(a.model.parameters()))


def test_periodic_validation_runs_every_k_steps_and_leaves_training_untouched(
    tiny_dataset, tmp_path
):
    seen = []

    def validate(model):
        seen.append((trainer.step, model.training))
        with torch.no_grad():  # a real forward: it must not disturb the trajectory
            model.loss(torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long))
        return {"val_loss": 1.5, "val_bpb": 0.75}

    cfg = tiny_config(tiny_dataset, val_loss_every=3)  # 12 iterations
    (tmp_path / "val").mkdir()
    log = RunLog(tmp_path / "val", True, False)
    trainer = Trainer(cfg, resolve_dataset(cfg.data), CPU_WORLD, tmp_path / "val", log, validate)
    trainer.run()
    assert seen == [(3, True), (6, True), (9, True)]  # not 12: the pre-quant score follows
    records = _records(tmp_path / "val")
    periodic = [r for r in records if r.get("eval_mode") == "periodic"]
    assert [(r["step"], r["val_bpb"]) for r in periodic] == [(3, 0.75), (6, 0.75), (9, 0.75)]
    steps = [r for r in records if "train_loss" in r]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in steps)
    plain = _logged_train(tiny_config(tiny_dataset), tmp_path / "plain")
    _assert_same_parameters(trainer.model, plain.model)


def test_loss_falls_on_official_fineweb_tokens(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, iterations=40, warmdown_iters=10)
    _logged_train(cfg, tmp_path / "run")
    losses = _losses(tmp_path / "run")
    assert losses[0] > 6.5  # ≈ ln(1024) = 6.93 at init
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0


def test_a_crashed_run_resumes_to_the_same_weights(tiny_dataset, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_dataset, checkpoint_every=5)
    reference, _ = _train(cfg, tmp_path / "reference")
    _kill_at_call(monkeypatch, 8, lambda: _train(cfg, tmp_path / "crashed"))
    resumed, result = _train(cfg, tmp_path / "crashed", resume=True)
    assert result.steps == cfg.train.iterations
    _assert_same_parameters(reference.model, resumed.model)


def test_compile_warmup_steps_are_fully_undone(tiny_dataset, tmp_path):
    plain, _ = _train(tiny_config(tiny_dataset), tmp_path / "plain")
    warmed, _ = _train(tiny_config(tiny_dataset, warmup_steps=3), tmp_path / "warm")
    _assert_same_parameters(plain.model, warmed.model)


def test_wallclock_cap_stops_training_early(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, iterations=10_000, max_wallclock_seconds=0.5)
    _, result = _train(cfg, tmp_path / "capped")
    assert result.stopped_by == "wallclock"
    assert 1 <= result.steps < 10_000
    assert result.train_time_ms >= 500


def test_calibration_reserve_stops_training_that_much_before_the_cap(
    tiny_dataset, tmp_path, monkeypatch
):
    # A fake clock that advances 100 ms per step makes the stop exact on a loaded machine.
    fake = {"ms": 0.0}
    original_step = Trainer._train_step

    def timed_step(self, scale, measure=False):
        fake["ms"] += 100.0
        return original_step(self, scale, measure)

    monkeypatch.setattr(Trainer, "_train_step", timed_step)
    monkeypatch.setattr(BudgetClock, "elapsed_train_ms", lambda self: fake["ms"])
    monkeypatch.setattr(BudgetClock, "stop", lambda self: fake["ms"])
    cfg = tiny_config(tiny_dataset, iterations=100, max_wallclock_seconds=1.0)
    _, full = _train(cfg, tmp_path / "full")
    fake["ms"] = 0.0
    cfg.train.gptq_reserve_seconds = 0.75
    _, reserved = _train(cfg, tmp_path / "reserved")
    assert (full.stopped_by, full.steps) == ("wallclock", 10)
    # Stops at the first step past 1.0 − 0.75 = 0.25 s, leaving the rest of the cap to calibration.
    assert (reserved.stopped_by, reserved.steps) == ("wallclock", 3)
    cfg.train.gptq_reserve_seconds = 1.0
    with pytest.raises(PgolfError, match="gptq_reserve_seconds=1.0 must be"):
        _train(cfg, tmp_path / "bad")


# Every training switch at once: what a resumed run must restore is the union of their states.
ALL_SWITCHES = dict(
    checkpoint_every=5,
    ema_enabled=True,
    swa_enabled=True,
    swa_every=1,
    swa_start_frac=0.9,
    late_qat_threshold=0.7,
    qat_clip_percentile=99.95,
    train_loader="coprime",
    muon_wd=0.04,
    muon_row_normalize=True,
    muon_polar_express=True,
    adam_wd=0.02,
    embed_wd=0.05,
    grad_clip_norm=0.3,
    warmdown_frac=0.5,
    min_lr=0.1,
    lr_warmup_steps=3,
)


def test_a_crashed_run_with_every_switch_on_resumes_bit_exactly(
    tiny_dataset, tmp_path, monkeypatch
):
    cfg = tiny_config(tiny_dataset, **ALL_SWITCHES)
    # Resuming from step 10 restores SWA snapshots (steps 8–10), QAT already on (from step 9),
    # the EMA, the loader's walks and every optimizer's decay state.
    reference, ref_result = _train(cfg, tmp_path / "reference")
    assert ref_result.weights.startswith("0.5·EMA + 0.5·SWA")
    _kill_at_call(monkeypatch, 11, lambda: _train(cfg, tmp_path / "crashed"))
    resumed, result = _train(cfg, tmp_path / "crashed", resume=True)
    assert result.weights == ref_result.weights
    ref_state, got_state = reference.model.state_dict(), resumed.model.state_dict()
    assert list(got_state) == list(ref_state)  # QAT left no trace in the parameter names
    for name, value in ref_state.items():
        assert torch.equal(value, got_state[name]), name


def test_batch_that_does_not_divide_into_sequences_is_refused(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, train_batch_tokens=1000)
    with pytest.raises(PgolfError, match="train_batch_tokens=1000 is not a multiple"):
        _train(cfg, tmp_path / "bad")


# -- two gloo processes ----------------------------------------------------------------------


def _ddp_worker(rank, world_size, port, data_dir, out_dir, iterations=12):
    from pgolf.dist import shutdown

    world = join_cpu_world(rank, world_size, port)
    cfg = tiny_config(data_dir, iterations=iterations)
    run_dir = out_dir / "ddp"
    trainer = Trainer(cfg, resolve_dataset(cfg.data), world, run_dir, RunLog(run_dir, False))
    result = trainer.run()
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save({"weights": weights, "loss": result.final_train_loss}, out_dir / f"rank{rank}.pt")
    shutdown(world)


def test_two_gloo_ranks_match_each_other_and_the_single_process_run(tiny_dataset, tmp_path):
    single, single_result = _train(tiny_config(tiny_dataset), tmp_path / "single")
    mp.spawn(_ddp_worker, args=(2, free_port(), tiny_dataset, tmp_path), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][name]), name
        torch.testing.assert_close(w, single.model.state_dict()[name], rtol=1e-4, atol=1e-5)
    # rank-local losses average to the global batch's loss; compare the mean of the two ranks
    ddp_loss = (r0["loss"] + r1["loss"]) / 2
    assert abs(ddp_loss - single_result.final_train_loss) < 1e-4


def _per_rank_loader_worker(rank, world_size, port, data_dir, out_dir):
    from pgolf.dist import shutdown

    world = join_cpu_world(rank, world_size, port)
    cfg = tiny_config(data_dir, train_loader="shuffled", grad_accum_steps=1)
    run_dir = out_dir / "ddp"
    trainer = Trainer(cfg, resolve_dataset(cfg.data), world, run_dir, RunLog(run_dir, False))
    for _ in range(3):
        trainer.loader.next_batch(1024, 64, 1)
    saved = trainer.state_dict()  # collective: every rank's loader position
    expected = trainer.loader.next_batch(1024, 64, 1)[0]
    fresh = Trainer(cfg, resolve_dataset(cfg.data), world, run_dir, RunLog(run_dir, False))
    fresh.load_state_dict(saved)
    resumed = fresh.loader.next_batch(1024, 64, 1)[0]
    torch.save(
        {"n": len(saved["loader"]["per_rank"]), "same": torch.equal(expected, resumed)},
        out_dir / f"loader{rank}.pt",
    )
    shutdown(world)


def test_per_rank_loader_positions_are_all_checkpointed_and_each_rank_gets_its_own(
    tiny_dataset, tmp_path
):
    # The shuffled loader gives each rank its own shards, so rank 0's position is not rank 1's.
    mp.spawn(_per_rank_loader_worker, args=(2, free_port(), tiny_dataset, tmp_path), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"loader{rank}.pt", weights_only=True)
        assert got == {"n": 2, "same": True}


def test_depth_recurrence_turns_on_at_the_configured_training_fraction(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset)
    m = cfg.model
    m.num_loops, m.loop_start, m.loop_end, m.enable_looping_at = 1, 1, 1, 0.5
    trainer = Trainer(cfg, resolve_dataset(cfg.data), CPU_WORLD, tmp_path, RunLog(tmp_path, False))
    seen = []
    original = trainer._train_step

    def spy(scale, measure=False):
        seen.append(trainer.model.recurrence_active)
        return original(scale, measure)

    trainer._train_step = spy
    trainer.run()
    assert seen == [step / 12 >= 0.5 for step in range(12)]


# -- checkpoints by wall time, Ctrl-C, resumed metrics --------------------------------------------


class _FakeClock:
    """Seconds that move only when a test says: 10 per training step, 1000 per checkpoint save."""

    def __init__(self):
        self.s = 0.0

    def __call__(self):
        return self.s


def test_checkpoints_follow_wall_time_and_their_saving_is_not_training_time(
    tiny_dataset, tmp_path, monkeypatch
):
    import pgolf.train.trainer as trainer_mod

    cfg = tiny_config(tiny_dataset, checkpoint_every_seconds=25)
    assert cfg.train.checkpoint_every == 0  # no step setting: the wall clock alone decides
    fake, saved_at = _FakeClock(), []
    trainer = Trainer(cfg, resolve_dataset(cfg.data), CPU_WORLD, tmp_path, RunLog(tmp_path, False))
    trainer.clock = BudgetClock(CPU_WORLD.device, now=fake)
    original_step, original_save = trainer._train_step, trainer_mod.save_checkpoint

    def ten_second_step(scale, measure=False):
        fake.s += 10.0
        return original_step(scale, measure)

    def slow_save(directory, state):
        saved_at.append(state["step"])
        fake.s += 1000.0
        return original_save(directory, state)

    trainer._train_step = ten_second_step
    monkeypatch.setattr(trainer_mod, "save_checkpoint", slow_save)
    result = trainer.run()
    # 25 s of wall time first passes after step 3; the interval restarts when a save ends; the
    # last save is the end-of-run checkpoint.
    assert saved_at == [3, 6, 9, 12, 12]
    assert result.train_time_ms == pytest.approx(12 * 10_000.0)  # the saves' 4,000 s excluded


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint_and_says_how_to_resume(
    tiny_dataset, tmp_path, capsys
):
    import signal

    from pgolf.train.trainer import TrainingInterrupted

    cfg = tiny_config(tiny_dataset, train_log_every=1)
    reference, _ = _train(cfg, tmp_path / "reference")
    run_dir = tmp_path / "interrupted"
    run_dir.mkdir()
    trainer = Trainer(cfg, resolve_dataset(cfg.data), CPU_WORLD, run_dir, RunLog(run_dir, True))
    original_step, calls = trainer._train_step, {"n": 0}

    def step_then_ctrl_c(scale, measure=False):
        out = original_step(scale, measure)  # the signal lands after the step's work
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGINT)
        return out

    trainer._train_step = step_then_ctrl_c
    with pytest.raises(TrainingInterrupted, match=f"pgolf train {run_dir} --resume"):
        trainer.run()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert "stopped at step 5" in capsys.readouterr().err
    assert torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)["step"] == 5
    resumed, result = _train(cfg, run_dir, resume=True)
    assert result.steps == cfg.train.iterations
    _assert_same_parameters(reference.model, resumed.model)


def test_a_resumed_run_logs_each_step_once(tiny_dataset, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_dataset, checkpoint_every=5, train_log_every=1)
    # Killed at step 8: steps 6 and 7 were logged after the step-5 checkpoint.
    _kill_at_call(monkeypatch, 8, lambda: _logged_train(cfg, tmp_path / "run"))
    run_dir = tmp_path / "run"
    Trainer(cfg, resolve_dataset(cfg.data), CPU_WORLD, run_dir, RunLog(run_dir, True, False)).run(
        resume=True
    )
    steps = [r["step"] for r in _records(run_dir) if "train_loss" in r]
    assert steps == list(range(1, 13))
