"""The run log: a short config line on stderr, a code hash that does not depend on imports."""

from __future__ import annotations

import sys

from pgolf.config import load_preset
from pgolf.runlog import RunLog, code_sha256, package_source_files


def test_the_config_goes_to_train_log_and_stderr_gets_one_short_line(tmp_path, capsys):
    config = load_preset("demo").to_dict()
    RunLog(tmp_path, enabled=True, echo=True).header(config, "cpu", 1)
    err = capsys.readouterr().err
    assert max(len(line) for line in err.splitlines()) < 200
    assert f"config: preset demo, resolved in {tmp_path}/config.json" in err
    log = (tmp_path / "train.log").read_text()
    assert any(line.startswith("config {") and len(line) > 1000 for line in log.splitlines())


def test_the_code_hash_is_the_same_whichever_pgolf_modules_were_imported(monkeypatch):
    import pgolf.observe.plot  # noqa: F401  (imported by `pgolf plot`, not by `pgolf train`)

    before = code_sha256(package_source_files())
    for name in [n for n in sys.modules if n.startswith(("pgolf.observe", "pgolf.audit"))]:
        monkeypatch.delitem(sys.modules, name)
    assert code_sha256(package_source_files()) == before
    assert {p.name for p in package_source_files()} >= {"stages.py", "plot.py", "trainer.py"}
