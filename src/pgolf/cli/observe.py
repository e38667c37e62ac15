"""`pgolf plot` and `pgolf ablate`: runs drawn, and switches toggled over seeds."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from pgolf.cli.common import add_json
from pgolf.cli.data import ensure_demo_data


def cmd_plot(args: argparse.Namespace) -> None:
    from pgolf.observe.plot import plot_runs

    result = plot_runs(args.runs, args.out, title=args.title)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"wrote {result['out']} ({len(result['runs'])} runs)")


def cmd_ablate(args: argparse.Namespace) -> None:
    from pgolf.observe.ablate import pipeline_run_fn, run_ablation

    common = list(args.set or [])
    if args.data:
        common.append(f"data.path={args.data}")
    elif args.preset == "demo":
        from pgolf.dist import init_world

        common.append(f"data.path={ensure_demo_data(init_world())}")
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    out = Path(args.out or Path("runs") / f"ablate_{args.preset}_{stamp}")

    def progress(row: dict) -> None:
        if not args.json:
            state = "reused" if row["skipped"] else "done"
            print(
                f"{row['variant']} seed {row['seed']}: val_bpb {row['val_bpb']:.4f} ({state})",
                file=sys.stderr,
            )

    result = run_ablation(
        args.preset,
        args.switch,
        args.seeds,
        common,
        out,
        pipeline_run_fn(args.preset, echo=not args.json),
        on_result=progress,
    )
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "markdown"}, sort_keys=True))
    else:
        print(result["markdown"])
        print(f"\nsaved {out / 'ablation.md'} and {out / 'ablation.json'}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot loss, BPB, quant gap and artifact bytes of runs")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--out", required=True, metavar="FILE.png")
    p.add_argument("--title", help="figure title (default: the run names)")
    add_json(p)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("ablate", help="toggle switches alone and together over seeds; t-tests")
    p.add_argument("--preset", default="demo")
    p.add_argument(
        "--switch",
        action="append",
        required=True,
        metavar="SECTION.KEY=VALUE",
        help="a setting to toggle on top of the preset (repeat for several)",
    )
    p.add_argument("--seeds", type=int, default=2, metavar="N", help="seeds per variant")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="for every run")
    p.add_argument("--data", metavar="DIR", help="dataset directory (default for demo: built)")
    p.add_argument("--out", metavar="DIR", help="default runs/ablate_PRESET_TIME; reuse to resume")
    add_json(p)
    p.set_defaults(func=cmd_ablate)
