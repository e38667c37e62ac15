"""Fit-to-cap: the code bytes it budgets for (SPEC §1.2) and no silent codec switch (§5.25)."""

from __future__ import annotations

import pytest

from pgolf.config import load_preset
from pgolf.errors import PgolfError
from pgolf.export.bundle import shipped_script
from pgolf.quant.fit import BYTES_CAP, fit_to_budget
from pgolf.quant.pipeline import code_budget, fit_log_lines, quantize_and_pack
from pgolf.quant.quantize import quantize_model
from pgolf.settings import shared_dir
from tests.test_quant_mixed import quant_cfg, small_model

# The scripts each record preset's submission ships, as in $PGOLF_SHARED/reference (SPEC §9).
RECORD_SCRIPTS = {
    "pr414": ["s414_train_gpt.py"],
    "pr549": ["s549_train_gpt.py"],
    "pr1019": ["s1019_train_gpt.py"],
    "pr1060": ["s1060_train_gpt.py"],
    "pr1413": ["s1413_train_gpt.py"],  # the lzma+base85 wrapper is the file that ships
    "seed-p639": ["p639_train_gpt.py"],
    "seed-p610": ["p610_train_gpt.py", "p610_eval_gptq.py", "p610_eval_ttt.py"],
    "seed-p1004": ["p1004_train_gpt.py"],
    "seed-p578": ["p578_train_gpt.py"],
    "seed-p1351": ["p1351_train_gpt.py"],
}
DECLARED = "quant.code_bytes (declared size of the record's script)"


@pytest.fixture(scope="module")
def model():
    return small_model()


def unpruned_size(model, **kw) -> int:
    packed, _ = fit_to_budget(quantize_model(model, quant_cfg(**kw), {}), 10**9, **kw)
    return len(packed.data)


@pytest.mark.parametrize("preset", sorted(RECORD_SCRIPTS))
def test_record_presets_declare_the_bytes_of_the_scripts_they_ship(preset):
    paths = [shared_dir() / "reference" / name for name in RECORD_SCRIPTS[preset]]
    if not all(p.is_file() for p in paths):
        pytest.fail(f"{paths} missing: set PGOLF_SHARED to the shared folder")
    cfg = load_preset(preset)
    assert code_budget(cfg) == (sum(p.stat().st_size for p in paths), DECLARED)


def test_fit_target_is_the_cap_minus_the_declared_code_bytes_to_the_byte(model):
    cfg = quant_cfg(code_bytes=83_260, compressor="zstd", fit_prune="none")
    run = load_preset("seed-p578")
    run.quant = cfg
    report = quantize_and_pack(model, cfg, {}, code_budget(run))
    assert report["target_bytes"] == BYTES_CAP - 83_260 == 15_916_740
    assert report["code_bytes"] == 83_260 and report["code_bytes_source"] == DECLARED
    assert report["target_bytes_source"] == "16,000,000 − code_bytes"
    assert report["bytes_total"] == report["bytes_model"] + 83_260
    assert fit_log_lines(report) == [
        f"fit target 15,916,740 = 16,000,000 − 83,260 code bytes ({DECLARED})"
    ]


def test_fit_prune_none_fits_when_the_declared_script_leaves_room(model):
    # A P578-like artifact scaled down: the declared script leaves 100 bytes to spare; a code
    # figure that leaves less than even `auto` needs (before: pgolf's ~340 KB of files) raises.
    size = unpruned_size(model, compressor="zstd")
    auto = unpruned_size(model, compressor="auto")
    declared = BYTES_CAP - size - 100
    cfg = quant_cfg(compressor="zstd", fit_prune="none")
    report = quantize_and_pack(model, cfg, {}, (declared, DECLARED))
    assert report["bytes_model"] == size and report["pruned"] is None
    assert report["bytes_total"] == BYTES_CAP - 100
    with pytest.raises(PgolfError, match="fit_prune=none allows no pruning"):
        quantize_and_pack(model, cfg, {}, (BYTES_CAP - auto + 1, "imported pgolf files"))


def test_undeclared_code_bytes_are_the_shipped_script_and_the_report_says_so():
    cfg = load_preset("demo")
    assert cfg.quant.code_bytes == 0
    shipped = len(shipped_script(cfg.to_dict()).encode("utf-8"))
    assert code_budget(cfg) == (shipped, "the shipped train_gpt.py")
    cfg.quant.code_bytes = 83_260  # a record's declared script size overrides it
    assert code_budget(cfg) == (83_260, DECLARED)


def test_inside_an_exported_script_the_script_itself_is_measured(monkeypatch, tmp_path):
    import pgolf

    # bundle.py gives every embedded module, pgolf included, the script as its __file__
    script = tmp_path / "train_gpt.py"
    script.write_text("# the exported script\n")
    monkeypatch.setattr(pgolf, "__file__", str(script))
    cfg = load_preset("demo")
    assert code_budget(cfg) == (script.stat().st_size, "this exported script")


def test_explicit_target_bytes_is_named_as_the_target_source(model):
    report = quantize_and_pack(model, quant_cfg(target_bytes=10**8), {}, (5_000, "test"))
    assert report["target_bytes"] == 10**8
    assert report["target_bytes_source"] == "quant.target_bytes"
    assert fit_log_lines(report) == ["fit target 100,000,000 model bytes (quant.target_bytes)"]


def test_fitter_switching_the_configured_codec_to_auto_is_reported(model):
    zstd, auto = unpruned_size(model, compressor="zstd"), unpruned_size(model, compressor="auto")
    assert auto < zstd  # rANS beats zstd on the int6 sections, so only `auto` meets the target
    cfg = quant_cfg(compressor="zstd", fit_prune="none")
    report = quantize_and_pack(model, cfg, {}, (BYTES_CAP - auto, "test"))
    switch = report["codec_switched"]
    assert report["bytes_model"] == auto and report["compressor"] == "auto"
    assert (switch["from"], switch["to"]) == ("zstd", "auto")
    assert switch["why"].startswith(f"zstd packed {zstd:,} bytes, over the {auto:,}-byte target")
    assert switch["sections"] and all(s["codec"] != "zstd" for s in switch["sections"])
    assert fit_log_lines(report)[-1] == f"codec switched zstd → auto: {switch['why']}"


@pytest.mark.parametrize("compressor", ["zstd", "auto"])
def test_no_codec_switch_reports_none(model, compressor):
    report = quantize_and_pack(model, quant_cfg(compressor=compressor), {}, (50_000, "test"))
    assert report["codec_switched"] is None and report["compressor"] == compressor
    assert not any(line.startswith("codec switched") for line in fit_log_lines(report))


def test_a_section_the_configured_codec_cannot_store_is_a_reported_switch(model):
    # The rANS coder stores int8 symbols only: the float16 sections go to `auto`.
    report = quantize_and_pack(model, quant_cfg(compressor="rans"), {}, (50_000, "test"))
    switch = report["codec_switched"]
    assert switch["why"] == "rans cannot store float16 sections; auto packed them"
    assert {s["dtype"] for s in switch["sections"]} == {"float16"}
    assert report["compressor"] == "rans"
    assert any(s["codec"] == "rans" for s in report["sections"])  # the int8 sections kept it


def test_report_json_summary_carries_the_fit_sources():
    from pgolf.run import QUANT_SUMMARY_KEYS

    wanted = {"code_bytes", "code_bytes_source", "target_bytes_source", "codec_switched"}
    assert wanted <= set(QUANT_SUMMARY_KEYS)
