"""The `pgolf` command line: parse, call a stage, print. Nothing else lives here.

Bad input (PgolfError) prints one line on stderr and exits 2; `--json` prints the result as one
JSON object on stdout while logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pgolf
from pgolf.errors import PgolfError


def _print_result(result: dict[str, Any], as_json: bool, human: str) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(human)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _add_allow_tokenizer_mismatch(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-tokenizer-mismatch",
        action="store_true",
        help="use a tokenizer other than the one the shards' meta.json records, or a "
        "model.vocab_size other than its vocabulary, on purpose",
    )


# -- data ------------------------------------------------------------------------------------
def cmd_data_build(args: argparse.Namespace) -> None:
    from pgolf.data.build import build_dataset

    result = build_dataset(
        inputs=args.input,
        out_dir=args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_docs=args.val_docs,
        max_docs=args.max_docs,
        text_field=args.text_field,
        blank_line_docs=args.blank_line_docs,
        shard_tokens=args.shard_tokens,
        progress=not args.json,
        caseops=args.caseops,
    )
    _print_result(result, args.json, json.dumps(result, indent=2))


def cmd_data_fetch(args: argparse.Namespace) -> None:
    from pgolf.data.fetch import fetch_dataset

    result = fetch_dataset(
        args.variant, args.out, train_shards=args.train_shards, progress=not args.json
    )
    _print_result(result, args.json, json.dumps(result, indent=2))


def cmd_data_demo(args: argparse.Namespace) -> None:
    from pgolf.data.demo import build_demo_dataset

    result = build_demo_dataset(args.out, progress=not args.json)
    _print_result(result, args.json, json.dumps(result, indent=2))


def cmd_data_inspect(args: argparse.Namespace) -> None:
    from pgolf.data.inspect import format_inspect, inspect_path

    result = inspect_path(
        args.path,
        tokenizer=args.tokenizer,
        allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
    )
    _print_result(result, args.json, format_inspect(result))


# -- presets ---------------------------------------------------------------------------------
def cmd_presets(args: argparse.Namespace) -> None:
    from pgolf.config import load_preset, preset_names, preset_summary
    from pgolf.model.gpt import count_parameters
    from pgolf.model.shapes import shapes_only_model

    if args.name:
        cfg = load_preset(args.name)
        _print_result(cfg.to_dict(), args.json, json.dumps(cfg.to_dict(), indent=2))
        return
    rows = {}
    for name in preset_names():
        params = count_parameters(shapes_only_model(load_preset(name).model))
        rows[name] = {"parameters": params, "summary": preset_summary(name)}
    human = _table([(k, f"{v['parameters']:>11,}  {v['summary']}") for k, v in rows.items()])
    _print_result(rows, args.json, human)


def presets_epilog() -> str:
    """The preset list for --help: every name with its one-line summary."""
    from pgolf.config import preset_names, preset_summary

    names = preset_names()
    return "presets:\n" + _table([(f"  {n}", preset_summary(n)) for n in names])


# -- run / stages ----------------------------------------------------------------------------
def demo_data_dir() -> Path:
    cache = Path(os.environ.get("PGOLF_CACHE", Path.home() / ".cache" / "pgolf"))
    return cache / "demo"


def _ensure_demo_data(world) -> Path:
    from pgolf.data.demo import build_demo_dataset
    from pgolf.dist import barrier

    out = demo_data_dir()
    if world.is_main and not (out / "meta.json").is_file():
        print(f"building the demo dataset in {out} (first use only)", file=sys.stderr)
        build_demo_dataset(out, progress=True)
    barrier(world)
    return out


def default_run_dir(preset: str, world, now=datetime.now) -> Path:
    """runs/PRESET_TIME, timed by rank 0: under torchrun, ranks reading their own clocks across
    a second boundary would each write their own folder."""
    from pgolf.dist import broadcast_object

    stamp = broadcast_object(now().strftime("%Y%m%d_%H%M%S"), world)
    return Path("runs") / f"{preset}_{stamp}"


def cmd_run(args: argparse.Namespace) -> None:
    from pgolf.config import resolve_config
    from pgolf.dist import init_world, shutdown
    from pgolf.run import run_pipeline, summary_rows

    assignments = list(args.set or [])
    world = init_world()
    try:
        if args.data:
            assignments.append(f"data.path={args.data}")
        elif args.preset == "demo" and not os.environ.get("DATA_PATH"):
            assignments.append(f"data.path={_ensure_demo_data(world)}")
        if args.allow_tokenizer_mismatch:
            assignments.append("data.allow_tokenizer_mismatch=true")
        cfg = resolve_config(args.preset, assignments)
        if cfg.illegal and not args.allow_illegal:
            raise PgolfError(
                f"preset {cfg.preset} reproduces an illegal submission ({cfg.illegal}); "
                "pass --allow-illegal to run it for research (the report will say so)"
            )
        run_dir = Path(args.out) if args.out else default_run_dir(args.preset, world)
        report = run_pipeline(
            run_dir,
            cfg,
            world,
            echo=not args.json,
            allow_illegal=args.allow_illegal,
            loggers=tuple(args.log or ()),
        )
    finally:
        shutdown(world)
    if world.is_main:
        human = f"run directory: {run_dir}\n" + _table(summary_rows(report))
        _print_result(report, args.json, human)


def _stage(args: argparse.Namespace, fn, then: str | None = None, rows=None, **kwargs) -> None:
    """Run one stage on RUN; `then` names the stages still to run, said on stderr; `rows` makes
    the human table of the stage's result (default: the report's summary)."""
    from pgolf.dist import init_world, shutdown
    from pgolf.run import summary_rows

    world = init_world()
    try:
        report = fn(Path(args.run), world, **kwargs)
    finally:
        shutdown(world)
    if world.is_main:
        _print_result(report, args.json, _table((rows or summary_rows)(report)))
        if then:
            print(f"next: {then}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> None:
    from pgolf.run import train_stage

    _stage(
        args,
        train_stage,
        then=f"pgolf quantize {args.run} && pgolf eval {args.run}",
        resume=args.resume,
        echo=not args.json,
        allow_illegal=args.allow_illegal,
    )


def cmd_quantize(args: argparse.Namespace) -> None:
    from pgolf.run import export_stage

    _stage(args, export_stage, then=f"pgolf eval {args.run}", echo=not args.json)


def cmd_eval(args: argparse.Namespace) -> None:
    from pgolf.eval.request import EvalRequest
    from pgolf.run import eval_rows, eval_stage

    request = EvalRequest(
        stride=args.stride,
        eval_len=args.eval_len,
        ttt=args.ttt,
        val=args.val,
        assignments=tuple(args.set or ()),
    )
    _stage(args, eval_stage, rows=eval_rows, echo=not args.json, request=request)


# -- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgolf",
        description="Train the best language model that fits 16,000,000 bytes.",
        epilog=presets_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pgolf {pgolf.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="build, fetch, inspect token shards")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = data_sub.add_parser("build", help="tokenize text/jsonl/parquet into shards")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--tokenizer", metavar="MODEL", help="an existing SentencePiece model")
    group.add_argument("--vocab-size", type=int, metavar="N", help="train a tokenizer of N pieces")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--val-docs", type=int, default=0, metavar="N", help="first N docs → val")
    p.add_argument("--max-docs", type=int, default=None, metavar="N")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column")
    p.add_argument(
        "--blank-line-docs", action="store_true", help=".txt: documents separated by blank lines"
    )
    p.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N")
    p.add_argument(
        "--caseops",
        action="store_true",
        help="the TOP record's lossless case transform (needs its CaseOps --tokenizer); val "
        "shards get per-token original-byte sidecars that BPB counts",
    )
    _add_json(p)
    p.set_defaults(func=cmd_data_build)

    p = data_sub.add_parser("fetch", help="download the official FineWeb shards")
    p.add_argument("--variant", required=True, choices=["sp1024", "sp4096", "sp8192"])
    p.add_argument(
        "--train-shards", type=int, default=80, metavar="N", help="as upstream: 80 = 8B tokens"
    )
    p.add_argument("--out", required=True, metavar="DIR")
    _add_json(p)
    p.set_defaults(func=cmd_data_fetch)

    p = data_sub.add_parser("demo", help="build the offline demo dataset (State of the Union)")
    p.add_argument("--out", required=True, metavar="DIR")
    _add_json(p)
    p.set_defaults(func=cmd_data_demo)

    p = data_sub.add_parser("inspect", help="tokens, documents and official byte counts")
    p.add_argument("path", metavar="PATH", help="a shard, a glob or a dataset directory")
    p.add_argument("--tokenizer", metavar="MODEL")
    _add_allow_tokenizer_mismatch(p)
    _add_json(p)
    p.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser("presets", help="list presets, or show one resolved")
    p.add_argument("name", nargs="?", help="show this preset's resolved config")
    _add_json(p)
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser(
        "run",
        help="data → train → quantize → eval in one go",
        epilog=presets_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="demo")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    p.add_argument("--data", metavar="DIR", help="dataset directory (default for demo: built)")
    p.add_argument("--out", metavar="RUN", help="run directory (default runs/PRESET_TIME)")
    p.add_argument(
        "--allow-illegal", action="store_true", help="run a preset that breaks the rules (research)"
    )
    _add_allow_tokenizer_mismatch(p)
    p.add_argument(
        "--log",
        action="append",
        choices=["tensorboard", "wandb"],
        help="also send metrics to TensorBoard / W&B (optional extras; repeatable)",
    )
    _add_json(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train (or resume) the run in RUN")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint")
    p.add_argument("--allow-illegal", action="store_true", help="allow rule-breaking settings")
    _add_json(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("quantize", help="quantize RUN's weights and write the artifact")
    p.add_argument("run", metavar="RUN")
    _add_json(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "eval",
        help="score RUN's artifact on the validation set",
        description="Score RUN's artifact. Under the run's own settings this refreshes the "
        "headline of RUN/report.json; under others (any flag below that changes them) the "
        "result is added to the report's `evaluations` and the headline stays as it was.",
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument("--stride", type=int, metavar="S", help="sliding windows with stride S")
    p.add_argument("--eval-len", type=int, metavar="T", help="window length T in tokens")
    p.add_argument(
        "--ttt",
        metavar="PRESET|off",
        help="score-first TTT with that preset's eval.ttt_* settings, or off",
    )
    p.add_argument(
        "--val", metavar="GLOB", help="other validation shards (a shard, glob or dataset dir)"
    )
    p.add_argument("--set", action="append", metavar="eval.KEY=VALUE", help="any eval setting")
    _add_json(p)
    p.set_defaults(func=cmd_eval)
    from pgolf.audit.commands import register as register_audit

    register_audit(sub)
    from pgolf.observe.commands import register as register_observe

    register_observe(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except PgolfError as exc:
        print(f"pgolf: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # training's says where its checkpoint is
        detail = f": {exc}" if str(exc) else ""
        print(f"pgolf: interrupted{detail}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
