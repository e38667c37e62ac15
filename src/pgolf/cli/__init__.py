"""The `pgolf` command line: parse, call a stage, print. The only CLI of pgolf: every command is
wired in this package (data, presets, stages, audit, observe), none in the stage packages.

Bad input (PgolfError) prints one line on stderr and exits 2; `--json` prints the result as one
JSON object on stdout while logs go to stderr.
"""

from __future__ import annotations

import argparse
import sys

import pgolf
from pgolf.cli import audit, data, observe, presets, stages
from pgolf.errors import PgolfError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgolf",
        description="Train the best language model that fits 16,000,000 bytes.",
        epilog=presets.presets_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pgolf {pgolf.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Registration order is the order `pgolf --help` lists the commands in.
    for commands in (data, presets, stages, audit, observe):
        commands.register(sub)
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
