"""`pgolf plot`: a readable PNG of two real (tiny) runs, and a one-line error without metrics."""

from __future__ import annotations

import json

import pytest

from pgolf.cli import main
from pgolf.dist import init_world
from pgolf.errors import PgolfError
from pgolf.observe.plot import PANELS, plot_runs
from pgolf.observe.runs import artifact_bytes_per_class, load_run
from pgolf.run import run_pipeline
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def two_tiny_runs(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("plot_runs")
    runs = []
    for seed in (1, 2):
        cfg = tiny_config(tiny_dataset, iterations=4, warmdown_iters=2, seed=seed)
        cfg.train.val_loss_every = 2  # one in-training score, at step 2
        run_pipeline(root / f"tiny_s{seed}", cfg, init_world(), echo=False)
        runs.append(root / f"tiny_s{seed}")
    return runs


def test_plot_renders_one_png_with_every_panel_for_two_runs(two_tiny_runs, tmp_path):
    out = tmp_path / "runs.png"
    result = plot_runs(two_tiny_runs, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["axes"] == len(PANELS) == 6
    assert result["titles"][0] == "loss vs step (validation dashed)"
    assert [r["steps"] for r in result["runs"]] == [4, 4]
    assert [r["val_points"] for r in result["runs"]] == [1, 1]
    for run in result["runs"]:
        assert set(run["bpb"]) >= {"pre_quant", "nonoverlapping"}
        assert "periodic" not in run["bpb"]  # the in-training curve is not a final score
        assert run["quant_gap"] == pytest.approx(
            run["bpb"]["nonoverlapping"] - run["bpb"]["pre_quant"]
        )


def test_int8_bytes_per_class_adds_up_to_the_artifact_size(two_tiny_runs):
    per_class, source = artifact_bytes_per_class(load_run(two_tiny_runs[0]))
    size = (two_tiny_runs[0] / "artifact.pgolf").stat().st_size
    assert source == "int8 artifact header"
    assert sum(per_class.values()) == pytest.approx(size)
    # 2 × 64: every tensor is under the int8 threshold, so all are kept as fp16/fp32 copies.
    assert {"embed (fp16)", "attn (fp16)", "mlp (fp16)", "scalar (float)"} <= set(per_class)


def test_plot_cli_writes_the_png_and_reports_json(two_tiny_runs, tmp_path, capsys):
    out = tmp_path / "cli.png"
    code = main(["plot", *map(str, two_tiny_runs), "--out", str(out), "--json"])
    assert code == 0 and out.is_file()
    assert json.loads(capsys.readouterr().out)["axes"] == 6


def test_a_run_without_metrics_is_a_one_line_error_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.json").write_text("{}")
    with pytest.raises(PgolfError, match="no metrics.jsonl"):
        load_run(tmp_path / "empty_run")
    code = main(["plot", str(tmp_path / "empty_run"), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "no metrics.jsonl" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_mixed_artifacts_use_the_quantizer_s_own_bytes_per_class(two_tiny_runs, tmp_path):
    run = tmp_path / "mixed"
    run.mkdir()
    (run / "metrics.jsonl").write_text((two_tiny_runs[0] / "metrics.jsonl").read_text())
    split = {"attn": 1000, "embed": 500, "mlp": 2000}
    (run / "report.json").write_text(json.dumps({"quant": {"bytes_per_class": split}}))
    assert artifact_bytes_per_class(load_run(run)) == (split, "quant.bytes_per_class")


def test_without_validation_the_first_panel_says_so_and_the_sixth_is_used(two_tiny_runs, tmp_path):
    run = tmp_path / "no_val"
    run.mkdir()
    lines = (two_tiny_runs[0] / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(r for r in lines if "periodic" not in r) + "\n")
    result = plot_runs([run], tmp_path / "no_val.png")
    assert "validation dashed" not in result["titles"][0]
    assert "no val_loss_every" in result["titles"][0]
    assert result["titles"][5] == "grad norm before clipping"


def test_each_quantization_class_keeps_its_colour_whatever_else_is_plotted():
    from pgolf.observe.plot import class_color

    assert class_color("mlp (int8)") == class_color("mlp (int8)")  # a pure function of the label
    labels = ["attn (int8)", "embed (fp16)", "mlp (int8)", "scalar (float)", "head", "table"]
    assert len({class_color(label) for label in labels}) == len(labels)
    assert class_color("mlp (int8)") != class_color("mlp (fp16)")  # storage told apart
