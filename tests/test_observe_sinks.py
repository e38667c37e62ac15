"""Metric sinks: RunLog forwards every record; a missing extra is a clear error, never a crash."""

from __future__ import annotations

import json

import pytest

from pgolf.errors import PgolfError
from pgolf.observe import sinks
from pgolf.runlog import RunLog


class FakeSink:
    def __init__(self):
        self.records = []

    def log(self, record):
        self.records.append(dict(record))

    def close(self):
        pass


def test_runlog_forwards_every_metrics_record_to_its_sinks(tmp_path):
    sink = FakeSink()
    log = RunLog(tmp_path, enabled=True, echo=False, sinks=[sink])
    log.metrics(step=1, train_loss=5.0, lr_scale=1.0)
    log.metrics(eval_mode="pre_quant", step=1, val_bpb=2.5)
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sink.records == written and len(written) == 2


def test_a_disabled_runlog_other_ranks_forwards_nothing(tmp_path):
    sink = FakeSink()
    RunLog(tmp_path / "r1", enabled=False, sinks=[sink]).metrics(step=1, train_loss=5.0)
    assert sink.records == []


def test_scalars_name_train_and_eval_records_apart():
    assert sinks.scalars({"step": 3, "train_loss": 4.0, "time": 1.0}) == (
        3,
        {"train/train_loss": 4.0},
    )
    step, values = sinks.scalars({"eval_mode": "sliding", "val_bpb": 1.2})
    assert step is None and values == {"eval/sliding/val_bpb": 1.2}


@pytest.mark.parametrize("name, module", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_extra_names_the_pip_command(name, module, tmp_path, monkeypatch):
    real_import = sinks.importlib.import_module

    def no_extra(mod):
        if mod.split(".")[0] == module or mod == "torch.utils.tensorboard":
            raise ImportError(f"No module named {mod!r}")
        return real_import(mod)

    monkeypatch.setattr(sinks.importlib, "import_module", no_extra)
    with pytest.raises(PgolfError, match=rf'pip install "pgolf\[{name}\]"'):
        sinks.open_sinks([name], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_sink_is_refused(tmp_path):
    with pytest.raises(PgolfError, match="unknown --log"):
        sinks.open_sinks(["mlflow"], tmp_path)


def test_run_with_a_missing_extra_exits_2_before_creating_the_run(tmp_path, monkeypatch, capsys):
    from pgolf.cli import main

    real_import = sinks.importlib.import_module

    def no_tensorboard(mod):
        if "tensorboard" in mod:
            raise ImportError(mod)
        return real_import(mod)

    monkeypatch.setattr(sinks.importlib, "import_module", no_tensorboard)
    run = tmp_path / "run"
    code = main(["run", "--preset", "baseline", "--data", str(tmp_path), "--out", str(run),
                 "--log", "tensorboard"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and 'pip install "pgolf[tensorboard]"' in err and not run.exists()


def test_tensorboard_sink_writes_scalars_at_the_training_step(tmp_path, monkeypatch):
    import sys
    import types

    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    fake_tb = types.ModuleType("torch.utils.tensorboard")
    fake_tb.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_tb)
    monkeypatch.setattr(sinks, "_OPEN", {})
    (sink,) = sinks.open_sinks(["tensorboard"], tmp_path)
    assert sink.writer.log_dir == str(tmp_path / "tensorboard")
    log = RunLog(tmp_path, enabled=True, echo=False, sinks=[sink])
    log.metrics(step=5, train_loss=4.0)
    log.metrics(eval_mode="nonoverlapping", val_bpb=2.5)  # final evals carry no step
    assert written == [("train/train_loss", 4.0, 5), ("eval/nonoverlapping/val_bpb", 2.5, 5)]
    assert sinks.open_sinks(["tensorboard"], tmp_path) == [sink]  # train + eval stages share it
