"""`pgolf run` and the stages it chains, each alone: `pgolf train|quantize|eval RUN`."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

from pgolf.cli.common import add_allow_tokenizer_mismatch, add_json, print_result, table
from pgolf.cli.data import ensure_demo_data
from pgolf.cli.presets import presets_epilog
from pgolf.errors import PgolfError


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
            assignments.append(f"data.path={ensure_demo_data(world)}")
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
        human = f"run directory: {run_dir}\n" + table(summary_rows(report))
        print_result(report, args.json, human)


def run_stage(args: argparse.Namespace, fn, then: str | None = None, rows=None, **kwargs) -> None:
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
        print_result(report, args.json, table((rows or summary_rows)(report)))
        if then:
            print(f"next: {then}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> None:
    from pgolf.run import train_stage

    run_stage(
        args,
        train_stage,
        then=f"pgolf quantize {args.run} && pgolf eval {args.run}",
        resume=args.resume,
        echo=not args.json,
        allow_illegal=args.allow_illegal,
    )


def cmd_quantize(args: argparse.Namespace) -> None:
    from pgolf.run import quantize_stage

    run_stage(args, quantize_stage, then=f"pgolf eval {args.run}", echo=not args.json)


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
    run_stage(args, eval_stage, rows=eval_rows, echo=not args.json, request=request)


def register(sub: argparse._SubParsersAction) -> None:
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
    add_allow_tokenizer_mismatch(p)
    p.add_argument(
        "--log",
        action="append",
        choices=["tensorboard", "wandb"],
        help="also send metrics to TensorBoard / W&B (optional extras; repeatable)",
    )
    add_json(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train (or resume) the run in RUN")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint")
    p.add_argument("--allow-illegal", action="store_true", help="allow rule-breaking settings")
    add_json(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("quantize", help="quantize RUN's weights and write the artifact")
    p.add_argument("run", metavar="RUN")
    add_json(p)
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
    add_json(p)
    p.set_defaults(func=cmd_eval)
