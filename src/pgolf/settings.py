"""Where the shared, read-only challenge files live (tokenizers, text samples).

One setting, `PGOLF_SHARED`, defaulting to `../shared` relative to the working directory, so the
same tests run in a developer checkout and in CI, where `shared/` sits beside the clone.
"""

from __future__ import annotations

import os
from pathlib import Path


def shared_dir() -> Path:
    return Path(os.environ.get("PGOLF_SHARED", "../shared")).resolve()


def shared_data(*parts: str) -> Path:
    return shared_dir().joinpath("data", *parts)
