import json

import pytest

from pgolf.config import (
    SECTIONS,
    RunConfig,
    apply_overrides,
    config_from_dict,
    load_preset,
    preset_names,
    resolve_config,
)
from pgolf.errors import PgolfError


def test_every_preset_loads_and_validates():
    assert {"baseline", "demo"} <= set(preset_names())
    for name in preset_names():
        cfg = resolve_config(name, environ={})
        assert cfg.preset == name


def test_baseline_preset_matches_the_official_script_defaults():
    cfg = load_preset("baseline")
    assert (cfg.model.num_layers, cfg.model.model_dim, cfg.model.num_heads) == (9, 512, 8)
    assert cfg.model.num_kv_heads == 4 and cfg.model.mlp_mult == 2.0
    assert cfg.train.train_batch_tokens == 524_288 and cfg.train.train_seq_len == 1024
    assert cfg.train.max_wallclock_seconds == 600.0 and cfg.train.warmdown_iters == 1200


def test_upstream_environment_names_override_the_preset_and_set_overrides_them():
    env = {"NUM_LAYERS": "4", "MODEL_DIM": "128", "MAX_WALLCLOCK_SECONDS": "0", "SEED": "7"}
    cfg = resolve_config("baseline", ["model.num_layers=3"], environ=env)
    assert cfg.model.num_layers == 3  # --set wins over the environment
    assert cfg.model.model_dim == 128
    assert cfg.train.max_wallclock_seconds == 0.0
    assert cfg.train.seed == 7


def test_booleans_and_floats_parse_from_strings():
    cfg = apply_overrides(RunConfig(), ["model.tie_embeddings=0", "model.mlp_mult=3"])
    assert cfg.model.tie_embeddings is False and cfg.model.mlp_mult == 3.0


@pytest.mark.parametrize(
    "assignment, fragment",
    [
        ("model.no_such_key=1", "unknown key model.no_such_key"),
        ("nosection.x=1", "unknown config section"),
        ("model.num_layers=four", "cannot read 'four' as int"),
        ("model.num_layers", "expected section.key=value"),
    ],
)
def test_bad_overrides_name_the_setting(assignment, fragment):
    with pytest.raises(PgolfError, match=fragment):
        resolve_config("baseline", [assignment], environ={})


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(PgolfError, match="unknown preset 'nope'.*baseline"):
        load_preset("nope")


def test_a_zero_budget_is_refused():
    with pytest.raises(PgolfError, match="budget is 0"):
        resolve_config("baseline", ["train.iterations=0"], environ={})


def test_config_round_trips_through_json_and_hash_is_stable():
    cfg = resolve_config("demo", ["train.seed=3"], environ={})
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.sha256() == cfg.sha256()
    assert resolve_config("demo", ["train.seed=4"], environ={}).sha256() != cfg.sha256()


def test_the_former_export_section_still_loads_as_quant(capsys):
    # Runs made before the quantizer's section was renamed: config.json loads silently.
    old = load_preset("pr1019").to_dict()
    old["export"] = old.pop("quant")
    old["export"]["code_measure"] = "imported"  # and a key retired before the rename
    assert config_from_dict(old).to_dict() == load_preset("pr1019").to_dict()
    assert capsys.readouterr().err == ""
    both = {**old, "quant": {}}
    with pytest.raises(PgolfError, match="both 'export' and 'quant'"):
        config_from_dict(both)
    # --set export.x=v is read as quant.x, with one line on stderr saying so.
    cfg = resolve_config("baseline", ["export.codec=mixed"], environ={})
    assert cfg.quant.codec == "mixed" and "export" not in cfg.to_dict()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "read as quant.codec" in err
    # Only here: the tree, and so every preset, names the section `quant` alone.
    assert "quant" in SECTIONS and "export" not in SECTIONS
