"""The command line of `benchmarks/vs_official.py` (issue #16): its flags, its refusal of
`--device cuda` where there is no CUDA, and its table. No timing runs here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_official.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_official_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_device_cuda_without_cuda_stops_at_once_with_a_clear_message(bench):
    with pytest.raises(SystemExit, match=r"--device cuda: CUDA is not available.*--device cpu"):
        bench.main(["--device", "cuda", "--pairs", "1"])


def test_defaults_and_the_only_selection(bench):
    args = bench.parse_args([])
    assert (args.pairs, args.threads, args.device, args.only) == (5, 1, "cpu", None)
    chosen = bench.parse_args(["--only", "gptq_512x1536", "train_pr1019"]).only
    assert chosen == ["gptq_512x1536", "train_pr1019"]
    assert set(bench.BUILDERS) == set(bench.MEASURES)


@pytest.mark.parametrize(
    "argv", [["--only", "nope"], ["--pairs", "0"], ["--threads", "0"], ["--device", "tpu"]]
)
def test_bad_flags_are_usage_errors(bench, argv, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.parse_args(argv)
    assert stop.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_table_has_one_row_per_measure(bench):
    row = dict(measure="gptq_512x1536", pgolf_median_s=1.5, official_median_s=3.0,
               ratio_median=0.5, pairs=5, device="cpu")  # fmt: skip
    lines = bench.markdown_table([row]).splitlines()
    assert len(lines) == 3 and lines[0].startswith("| measure |")
    assert lines[2] == "| gptq_512x1536 | 1.5 | 3 | 0.50 | 5 | cpu |"
