"""Code bytes of the `train_gpt.py` `pgolf export` ships, per preset, next to the record's own.

    PGOLF_SHARED=../shared python benchmarks/export_size.py [PRESET ...]

One JSON line per preset: the form shipped (`lean`: pgolf.export.lean's record-style script;
`bundle`: pgolf's own modules), the readable script (`train_gpt_readable.py`, not counted), the
minified one the stub decompresses, the shipped stub (the submission's `bytes_code`), and the
record's script as its PR shipped it (`../shared/reference`), minified and wrapped the same way.
Sizes do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json

from pgolf.config import load_preset, preset_names
from pgolf.export.bundle import compress_script, is_lean, readable_script, shipped_script
from pgolf.export.reach import minify
from pgolf.settings import shared_dir

RECORD_SCRIPTS = {
    "baseline": "base_train_gpt.py",
    "pr414": "s414_train_gpt.py",
    "pr549": "s549_train_gpt.py",
    "pr1019": "s1019_train_gpt.py",
    "pr1060": "s1060_train_gpt.py",
    "pr1413": "s1413_train_gpt.py",
    "top": "top_train_gpt.py",
    "seed-p578": "p578_train_gpt.py",
    "seed-p610": "p610_train_gpt.py",
    "seed-p639": "p639_train_gpt.py",
    "seed-p1004": "p1004_train_gpt.py",
    "seed-p1351": "p1351_train_gpt.py",
}


def record_sizes(preset: str) -> dict:
    name = RECORD_SCRIPTS.get(preset)
    if name is None:
        return {}
    text = (shared_dir() / "reference" / name).read_text(encoding="utf-8")
    # S1413 shipped its lzma + base85 wrapper already; the others a plain script
    wrapped = (
        len(text.encode())
        if text.startswith("import lzma")
        else len(compress_script(minify(text)).encode())
    )
    return {"record_script": name, "record_bytes": len(text.encode()), "record_wrapped": wrapped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=preset_names())
    args = parser.parse_args()
    for preset in args.presets:
        config = load_preset(preset).to_dict()
        row = {
            "preset": preset,
            "form": "lean" if is_lean(config) else "bundle",
            "readable": len(readable_script(config).encode()),
            "shipped": len(shipped_script(config).encode()),
            **record_sizes(preset),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
