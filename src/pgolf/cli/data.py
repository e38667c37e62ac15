"""`pgolf data build|fetch|demo|inspect`, and the demo dataset `pgolf run`/`ablate` build on
first use."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pgolf.cli.common import add_allow_tokenizer_mismatch, add_json, print_result


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
    print_result(result, args.json, json.dumps(result, indent=2))


def cmd_data_fetch(args: argparse.Namespace) -> None:
    from pgolf.data.fetch import fetch_dataset

    result = fetch_dataset(
        args.variant, args.out, train_shards=args.train_shards, progress=not args.json
    )
    print_result(result, args.json, json.dumps(result, indent=2))


def cmd_data_demo(args: argparse.Namespace) -> None:
    from pgolf.data.demo import build_demo_dataset

    result = build_demo_dataset(args.out, progress=not args.json)
    print_result(result, args.json, json.dumps(result, indent=2))


def cmd_data_inspect(args: argparse.Namespace) -> None:
    from pgolf.data.inspect import format_inspect, inspect_path

    result = inspect_path(
        args.path,
        tokenizer=args.tokenizer,
        allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
    )
    print_result(result, args.json, format_inspect(result))


def demo_data_dir() -> Path:
    cache = Path(os.environ.get("PGOLF_CACHE", Path.home() / ".cache" / "pgolf"))
    return cache / "demo"


def ensure_demo_data(world) -> Path:
    from pgolf.data.demo import build_demo_dataset
    from pgolf.dist import barrier

    out = demo_data_dir()
    if world.is_main and not (out / "meta.json").is_file():
        print(f"building the demo dataset in {out} (first use only)", file=sys.stderr)
        build_demo_dataset(out, progress=True)
    barrier(world)
    return out


def register(sub: argparse._SubParsersAction) -> None:
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
    add_json(p)
    p.set_defaults(func=cmd_data_build)

    p = data_sub.add_parser("fetch", help="download the official FineWeb shards")
    p.add_argument("--variant", required=True, choices=["sp1024", "sp4096", "sp8192"])
    p.add_argument(
        "--train-shards", type=int, default=80, metavar="N", help="as upstream: 80 = 8B tokens"
    )
    p.add_argument("--out", required=True, metavar="DIR")
    add_json(p)
    p.set_defaults(func=cmd_data_fetch)

    p = data_sub.add_parser("demo", help="build the offline demo dataset (State of the Union)")
    p.add_argument("--out", required=True, metavar="DIR")
    add_json(p)
    p.set_defaults(func=cmd_data_demo)

    p = data_sub.add_parser("inspect", help="tokens, documents and official byte counts")
    p.add_argument("path", metavar="PATH", help="a shard, a glob or a dataset directory")
    p.add_argument("--tokenizer", metavar="MODEL")
    add_allow_tokenizer_mismatch(p)
    add_json(p)
    p.set_defaults(func=cmd_data_inspect)
