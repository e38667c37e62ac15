"""`pgolf audit`, `pgolf export` and `pgolf compare`: finished runs judged, packaged, compared.

Bad input raises PgolfError (exit 2 in `pgolf.cli.main`); a failed audit returns 1.
"""

from __future__ import annotations

import argparse
import json

from pgolf.cli.common import add_json


def format_audit(result: dict) -> str:
    lines = [f"audit of {result['run']}"]
    width = max(len(v["rule"]) for v in result["verdicts"])
    for v in result["verdicts"]:
        lines.append(f"  {v['rule'].ljust(width)}  {v['status'].upper():8}  {v['detail']}")
    overall = "FAIL" if not result["ok"] else ("PASS" if result["proven"] else "PASS (unproven)")
    lines.append(f"  {'overall'.ljust(width)}  {overall}")
    return "\n".join(lines)


def cmd_audit(args: argparse.Namespace) -> int:
    from pgolf.audit.checks import audit_run

    results = [audit_run(run) for run in args.runs]
    if args.json:
        payload = results[0] if len(results) == 1 else {"runs": results}
        print(json.dumps(payload, sort_keys=True))
    else:
        print("\n".join(format_audit(r) for r in results))
    return 0 if all(r["ok"] for r in results) else 1


def cmd_export(args: argparse.Namespace) -> int:
    from pgolf.export.submission import export_submission

    result = export_submission(
        args.runs,
        args.out,
        force=args.force,
        author=args.author,
        github_id=args.github_id,
        name=args.name,
        blurb=args.blurb,
    )
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        sub = result["submission"]
        print(f"wrote {result['out']}: {', '.join(result['files'])}")
        print(
            f"val_bpb {sub['val_bpb']:.6f} over seeds {sub['seeds']}; bytes_total "
            f"{sub['bytes_total']:,} ({sub['bytes_code']:,} code)"
        )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pgolf.audit.compare import compare, format_compare

    result = compare(args.runs, args.against)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(format_compare(result))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="one verdict per challenge rule for finished runs")
    p.add_argument("runs", nargs="+", metavar="RUN")
    add_json(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("export", help="write the records folder of a submission (SPEC §1.6)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="seed runs of one config")
    p.add_argument("--out", required=True, metavar="FOLDER")
    p.add_argument("--force", action="store_true", help="write into an existing folder")
    p.add_argument("--author", help="default: git config user.name")
    p.add_argument("--github-id", help="your GitHub user name (default: none)")
    p.add_argument("--name", help="submission name (default: pgolf PRESET)")
    p.add_argument("--blurb", help="one-paragraph description")
    add_json(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "compare", help="per-seed table and the 0.005-nat, p<0.01 record test (SPEC §1.5)"
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="seed runs of one config")
    p.add_argument(
        "--against",
        nargs="+",
        metavar="BPB_OR_RUN",
        help="comparison: BPB scores, or runs (e.g. the current record's seeds)",
    )
    add_json(p)
    p.set_defaults(func=cmd_compare)
