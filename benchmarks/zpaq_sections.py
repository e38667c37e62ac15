"""pgolf's section codecs against ZPAQ on one run's artifact: the byte difference TOP's lrzip buys.

TOP compresses its int6 groups with `lrzip -z -L 9` (SPEC §5.31: an rzip long-range pass, then
ZPAQ). No `lrzip` binary is on pgolf's machines, so this measures ZPAQ alone (the `zpaq` wheel,
level 5, one thread, not a pgolf dependency: `pip install zpaq`) on exactly the bytes of each
section of RUN/artifact.pgolf, as pgolf's quantize stage grouped them (RUN/quant_report.json),
against the codec pgolf chose for that section.

    python benchmarks/zpaq_sections.py RUN [RUN ...]

One JSON line per section, then one per run with the totals.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pgolf import rundir
from pgolf.artifact.container import read_artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    try:
        import zpaq
    except ImportError:
        raise SystemExit("this benchmark needs the zpaq wheel: pip install zpaq") from None
    for run in args.runs:
        tensors, _ = read_artifact(run / rundir.ARTIFACT)
        sections = json.loads((run / "quant_report.json").read_text())["sections"]
        pgolf_total = zpaq_total = best_total = 0
        t0 = time.perf_counter()
        for section in sections:
            raw = b"".join(np.ascontiguousarray(tensors[n]).tobytes() for n in section["names"])
            if len(raw) != section["raw_nbytes"]:
                raise SystemExit(f"{run}: section {section['names'][:2]} is not the packed bytes")
            z = len(zpaq.compress(raw, level=5, threads=1))
            pgolf_total += section["nbytes"]
            zpaq_total += z
            best_total += min(z, section["nbytes"])
            print(
                json.dumps(
                    {
                        "section": section["names"][:2],
                        "raw": len(raw),
                        "pgolf": section["nbytes"],
                        "codec": section["codec"],
                        "zpaq": z,
                    }
                )
            )
        print(
            json.dumps(
                {
                    "run": str(run),
                    "sections": len(sections),
                    "pgolf_bytes": pgolf_total,
                    "zpaq_bytes": zpaq_total,
                    "best_of_both": best_total,
                    "zpaq_minus_pgolf": zpaq_total - pgolf_total,
                    "zpaq_s": round(time.perf_counter() - t0, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
