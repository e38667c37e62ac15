"""The record and seed presets (SPEC §9): sizes as logged, causal, trainable when shrunk."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch

from pgolf.cli import main as cli_main
from pgolf.config import ModelConfig, load_preset, preset_names, resolve_config, validate_config
from pgolf.data.dataset import resolve_dataset
from pgolf.dist import World
from pgolf.errors import PgolfError
from pgolf.model.gpt import GPT, count_parameters
from pgolf.model.layout import resolve_layout
from pgolf.runlog import RunLog
from pgolf.train.trainer import Trainer
from tests.conftest import tiny_config

# Parameter counts. Logged: BASE/train.log (SPEC §4.1), P1351's logs (SPEC §9.5, the same
# architecture as S414, P610, P578), S1060's train_seed1337.log, S1019's `model_params:27067484`.
# pgolf's own (no log in SPEC): pr549, pr1413, seed-p639, seed-p1004 at the final code's 6144
# buckets (its logged runs, 8192 buckets: 33,580,124, checked below), and top (equal to the
# record's own GPT built at its defaults, tests/parity/test_top_model.py at a shrunk shape).
EXPECTED_PARAMS = {
    "baseline": 17_059_912,
    "pr414": 26_993_756,
    "pr549": 26_928_220,
    "pr1019": 27_067_484,
    "pr1060": 27_038_812,
    "pr1413": 35_943_512,
    "seed-p639": 27_124_848,
    "seed-p610": 26_993_756,
    "seed-p1004": 33_317_980,
    "seed-p578": 26_993_756,
    "seed-p1351": 26_993_756,
    "top": 35_945_671,
}
RECORDS = sorted(set(EXPECTED_PARAMS) - {"baseline"})
CPU_WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def param_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return count_parameters(GPT(cfg))


def shrink(model: ModelConfig, vocab_size: int | None = None) -> ModelConfig:
    """The preset at CPU size: 128 wide, head dim 64 as in the records, GQA or MHA kept.

    4 layers, or 8 for a looped preset: its loop range (-7..-6 = 4..5 of 11) needs ≥ 7 layers.
    Bigram/VE dims of 64 keep their projections above the orthogonal init's 64-dim threshold.
    """
    mha = model.num_kv_heads == model.num_heads
    changes = dict(num_layers=8 if model.num_loops else 4, model_dim=128, num_heads=2)
    changes["num_kv_heads"] = 2 if mha else 1
    if model.bigram_vocab_size:
        changes.update(bigram_vocab_size=64, bigram_dim=64)
    if model.ve_enabled:
        changes["ve_dim"] = 64
    if vocab_size:
        changes["vocab_size"] = vocab_size
    return dataclasses.replace(model, **changes)


def test_the_record_and_seed_presets_are_all_there():
    assert set(EXPECTED_PARAMS) <= set(preset_names())


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_every_preset_has_its_records_parameter_count(name):
    assert param_count(load_preset(name).model) == EXPECTED_PARAMS[name]


def test_p1004_with_the_logged_runs_bigram_has_their_logged_count():
    cfg = dataclasses.replace(load_preset("seed-p1004").model, bigram_vocab_size=8192)
    assert param_count(cfg) == 33_580_124  # SPEC §9.3


def test_pgolf_presets_lists_every_preset_with_its_parameter_count(capsys):
    assert cli_main(["presets", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {k: listed[k]["parameters"] for k in EXPECTED_PARAMS} == EXPECTED_PARAMS
    assert all(listed[k]["summary"] for k in listed)


def test_help_lists_every_preset_with_its_one_line_summary(capsys):
    from pgolf.cli import build_parser
    from pgolf.config import preset_names, preset_summary

    top = build_parser().format_help()
    with pytest.raises(SystemExit):
        cli_main(["run", "--help"])
    run_help = capsys.readouterr().out
    for name in preset_names():
        summary = preset_summary(name)
        assert summary and len(summary) <= 100, name
        assert f"{name}  " in top and summary in top
        assert summary in run_help


def test_only_the_pre_quant_ttt_seed_is_marked_illegal():
    assert "§5.30" in load_preset("seed-p1351").illegal
    assert all(not load_preset(n).illegal for n in EXPECTED_PARAMS if n != "seed-p1351")


@pytest.mark.parametrize("name", RECORDS)
def test_every_preset_value_cites_its_source_and_none_is_left_pending(name):
    from importlib import resources

    text = resources.files("pgolf.presets").joinpath(f"{name}.toml").read_text()
    assignments = [ln for ln in text.splitlines() if re.match(r"^[a-z_]+\s*=", ln)]
    own_words = ("illegal", "summary")  # the preset's own statements, not sourced values
    uncommented = [ln for ln in assignments if "#" not in ln and not ln.startswith(own_words)]
    assert not uncommented
    assert "pending" not in text  # every setting of the record is a real field now


@pytest.mark.parametrize("name", RECORDS)
def test_every_record_preset_validates_with_its_training_quant_and_eval_fields(name):
    cfg = load_preset(name)
    validate_config(cfg)
    assert cfg.quant.codec == "mixed"  # GPTQ / GPTQ-lite + per-section compression (SPEC §5.19)
    assert cfg.eval.eval_mode == "sliding" and cfg.eval.eval_stride == 64  # SPEC §3.6
    assert cfg.train.ema_enabled and cfg.train.ema_decay == 0  # the run-relative horizon
    assert cfg.train.muon_wd > 0  # every record after S414 decays Muon weights (SPEC §5.17)


def test_layer_lists_keep_their_meaning_when_num_layers_shrinks_to_4():
    def layout(name):
        return resolve_layout(resolve_config(name, environ={"NUM_LAYERS": "4"}).model)

    assert layout("pr414").xsa == (0, 1, 2, 3)  # last 4 of 4
    assert layout("pr414").ve == (2, 3)  # 9,10 of 11 → the last two
    assert layout("pr1060").xsa == (0, 1, 2, 3)  # XSA-all stays all
    assert layout("seed-p578").ve == (2, 3)
    # The loop 4..5 of 11 has no counterpart at 4 layers: an error naming the field, never a
    # silently dropped recurrence.
    with pytest.raises(PgolfError, match="loop_start=-7"):
        layout("pr1413")
    looped8 = resolve_layout(resolve_config("pr1413", environ={"NUM_LAYERS": "8"}).model)
    assert looped8.looped[0] + looped8.looped[1] == (0, 1, 2, 1, 2, 1, 2, 3, 4, 5, 6, 7)


def test_the_records_environment_names_reach_the_model_config():
    env = {
        "XSA_LAST_N": "11",
        "BIGRAM_VOCAB_SIZE": "3072",
        "BIGRAM_DIM": "112",
        "ROPE_DIMS": "16",
        "LN_SCALE": "1",
        "VE_ENABLED": "1",
        "VE_DIM": "128",
        "VE_LAYERS": "9,10",
        "QK_GAIN_INIT": "5.25",
        "VRL": "1",
        "NUM_LOOPS": "2",
        "LOOP_START": "3",
        "LOOP_END": "5",
        "ENABLE_LOOPING_AT": "0.35",
        "PARALLEL_RESIDUAL_START": "7",
        "SKIP_GATES_ENABLED": "1",
        "ROPE_TRAIN_SEQ_LEN": "2048",
        "MLP_MULT": "3.5",
        "NUM_LAYERS": "11",
    }
    m = resolve_config("baseline", environ=env).model
    got = (m.xsa_last_n, m.bigram_vocab_size, m.bigram_dim, m.rope_dims, m.ln_scale)
    assert got == (11, 3072, 112, 16, True)
    assert (m.ve_enabled, m.ve_dim, m.ve_layers, m.qk_gain_init) == (True, 128, "9,10", 5.25)
    assert (m.value_residual, m.num_loops, m.loop_start, m.loop_end) == (True, 2, 3, 5)
    assert (m.enable_looping_at, m.parallel_residual_start, m.skip_gates) == (0.35, 7, True)
    assert (m.rope_train_seq_len, m.mlp_mult) == (2048, 3.5)
    layout = resolve_layout(m)
    assert layout.parallel == (7, 8, 9, 10) and layout.ve == (9, 10)


def _assert_causal(model: GPT, vocab: int) -> None:
    x = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    x[:, 7] = 1  # a BOS inside the window
    model.eval()
    with torch.no_grad():
        base = model(x)
        for t in (0, 6, 12, 18):
            changed = x.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 7 + t) % vocab
            out = model(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
            assert not torch.allclose(out[:, t + 1], base[:, t + 1], atol=1e-5)


@pytest.mark.parametrize("name", RECORDS)
def test_every_shrunk_preset_keeps_logits_blind_to_later_tokens(name):
    cfg = shrink(load_preset(name).model)
    torch.manual_seed(0)
    model = GPT(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the init: zero tables, gates and projections would hide leaks
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    _assert_causal(model, cfg.vocab_size)


@pytest.mark.parametrize("name", RECORDS)
def test_every_shrunk_preset_trains_three_steps_with_its_own_optimizer_settings(
    name, tiny_dataset, tmp_path
):
    cfg = load_preset(name)
    cfg.model = shrink(cfg.model, vocab_size=1024)  # the tiny dataset is sp1024
    base = tiny_config(tiny_dataset)  # the data/eval sizes of the trainer tests
    cfg.data, cfg.eval = base.data, base.eval
    t = cfg.train
    t.train_seq_len, t.train_batch_tokens, t.iterations = 64, 1024, 3
    t.warmdown_iters, t.warmup_steps, t.max_wallclock_seconds, t.grad_accum_steps = 2, 0, 0.0, 1
    trainer = Trainer(cfg, resolve_dataset(cfg.data), CPU_WORLD, tmp_path, RunLog(tmp_path, False))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.run()
    assert result.steps == 3 and math.isfinite(result.final_train_loss)
    after = trainer.model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) == len(before), set(before) - set(moved)  # every tensor learned


@pytest.mark.parametrize("name", preset_names())
def test_the_shapes_only_build_has_every_parameter_of_the_meta_build(name):
    from pgolf.model.roles import role_of
    from pgolf.model.shapes import shapes_only_model

    def layout(model):
        return [(n, tuple(p.shape), role_of(p)) for n, p in model.named_parameters()]

    cfg = load_preset(name).model
    with torch.device("meta"):
        reference = GPT(cfg)
    assert layout(shapes_only_model(cfg)) == layout(reference)


@pytest.mark.parametrize("name", ["demo", "baseline"])
def test_the_shapes_only_count_equals_a_real_build(name):
    from pgolf.model.shapes import shapes_only_model

    cfg = load_preset(name).model
    assert count_parameters(shapes_only_model(cfg)) == count_parameters(GPT(cfg))
