"""`pgolf presets`, and the preset list `pgolf --help` and `pgolf run --help` end with."""

from __future__ import annotations

import argparse
import json

from pgolf.cli.common import add_json, print_result, table


def cmd_presets(args: argparse.Namespace) -> None:
    from pgolf.config import load_preset, preset_names, preset_summary
    from pgolf.model.gpt import count_parameters
    from pgolf.model.shapes import shapes_only_model

    if args.name:
        cfg = load_preset(args.name)
        print_result(cfg.to_dict(), args.json, json.dumps(cfg.to_dict(), indent=2))
        return
    rows = {}
    for name in preset_names():
        params = count_parameters(shapes_only_model(load_preset(name).model))
        rows[name] = {"parameters": params, "summary": preset_summary(name)}
    human = table([(k, f"{v['parameters']:>11,}  {v['summary']}") for k, v in rows.items()])
    print_result(rows, args.json, human)


def presets_epilog() -> str:
    """The preset list for --help: every name with its one-line summary."""
    from pgolf.config import preset_names, preset_summary

    names = preset_names()
    return "presets:\n" + table([(f"  {n}", preset_summary(n)) for n in names])


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list presets, or show one resolved")
    p.add_argument("name", nargs="?", help="show this preset's resolved config")
    add_json(p)
    p.set_defaults(func=cmd_presets)
