"""`pgolf compare`: Welch's t-test equals scipy's, and the 0.005-nat rule of SPEC §1.5."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

from pgolf.audit.stats import betainc, t_sf, welch_t_test
from pgolf.cli import main
from tests.conftest import tiny_config

LN2 = math.log(2)


@pytest.mark.parametrize(
    "a, b",
    [
        ([1.9001, 1.9012, 1.8995], [1.9105, 1.9121, 1.9098]),
        ([2.0, 2.01, 1.99, 2.02, 2.005], [1.98, 2.03]),
        ([0.5, 0.7, 0.6], [0.9, 1.4, 0.2, 1.1]),
        ([1.0, 1.0001], [5.0, 5.0002, 4.9999]),  # far apart: p in the deep tail
    ],
)
def test_welch_t_df_and_p_equal_scipy(a, b):
    ours = welch_t_test(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert ours.t == pytest.approx(ref.statistic, rel=1e-12)
    assert ours.df == pytest.approx(ref.df, rel=1e-12)
    assert ours.p_two_sided == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)


def test_t_tail_and_incomplete_beta_equal_scipy():
    for t, df in [(0.3, 2.5), (-1.7, 4.0), (3.2, 3.3063), (11.8, 3.3063), (0.0, 7.0)]:
        assert t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-10)
    for a, b, x in [(0.5, 0.5, 0.3), (2.0, 0.5, 0.9), (10.0, 3.0, 0.7)]:
        assert betainc(a, b, x) == pytest.approx(stats.beta.cdf(x, a, b), rel=1e-10)


def _fake_run(root, name, data_dir, seed, val_loss, **overrides):
    """A run directory with only what compare reads: config.json and an evaluated report."""
    cfg = tiny_config(data_dir, seed=seed)
    for key, value in overrides.items():
        setattr(cfg.model, key, value)
    run = root / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    tokens, nbytes = 1000, 2436  # ≈ 0.4105 tokens per byte, as sp1024
    report = {"val_loss": val_loss, "val_bpb": val_loss * tokens / (nbytes * LN2),
              "val_tokens": tokens, "val_bytes": nbytes, "bytes_total": 15_000_000,
              "seed": seed}  # fmt: skip
    (run / "report.json").write_text(json.dumps(report))
    return run


def test_compare_runs_against_runs_and_bpb_scores(tmp_path, tiny_dataset, capsys):
    ours = [_fake_run(tmp_path, f"new{s}", tiny_dataset, s, v)
            for s, v in [(1, 1.8900), (2, 1.8912), (3, 1.8895)]]  # fmt: skip
    old = [_fake_run(tmp_path, f"old{s}", tiny_dataset, s, v, num_layers=3)
           for s, v in [(1, 1.9001), (2, 1.9012), (3, 1.8995)]]  # fmt: skip
    code = main(["compare", *map(str, ours), "--against", *map(str, old), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    c = result["comparison"]
    ref = stats.ttest_ind([1.8900, 1.8912, 1.8895], [1.9001, 1.9012, 1.8995], equal_var=False)
    assert c["welch_t"] == pytest.approx(ref.statistic) and c["welch_df"] == pytest.approx(ref.df)
    assert c["p_two_sided"] == pytest.approx(ref.pvalue)
    assert c["improvement_nats"] == pytest.approx(0.01003333, abs=1e-7)
    assert c["improvement_bpb"] == pytest.approx(c["improvement_nats"] * 1000 / (2436 * LN2))
    margin = stats.ttest_ind(
        [1.9001 - 0.005, 1.9012 - 0.005, 1.8995 - 0.005], [1.8900, 1.8912, 1.8895],
        equal_var=False, alternative="greater",
    )  # fmt: skip
    assert c["p_margin_one_sided"] == pytest.approx(margin.pvalue)
    assert c["record"] is bool(margin.pvalue < 0.01) is True
    assert result["val_loss_std"] == pytest.approx(stats.tstd([1.8900, 1.8912, 1.8895]))

    # a published BPB score: converted to nats with the runs' tokens per byte
    code = main(["compare", *map(str, ours), "--against", "1.1180"])
    text = capsys.readouterr().out
    assert code == 0 and "record rule" in text and "bpb" in text


def test_compare_refuses_mixed_configs_and_runs_without_reports(tmp_path, tiny_dataset, capsys):
    a = _fake_run(tmp_path, "a", tiny_dataset, 1, 1.9)
    b = _fake_run(tmp_path, "b", tiny_dataset, 2, 1.9, num_layers=3)
    assert main(["compare", str(a), str(b)]) == 2
    assert "model.num_layers" in capsys.readouterr().err
    c = _fake_run(tmp_path, "c", tiny_dataset, 1, 1.9)
    assert main(["compare", str(a), str(c)]) == 2
    assert "same seed" in capsys.readouterr().err
    (c / "report.json").unlink()
    assert main(["compare", str(a), str(c)]) == 2
    assert "no evaluated report.json" in capsys.readouterr().err


def test_audit_export_compare_have_help():
    for command in ("audit", "export", "compare"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
