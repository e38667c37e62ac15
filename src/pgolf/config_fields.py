"""`env_field`: a dataclass field that the official script also reads from an environment name."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def env_field(name: str, default: Any) -> Any:
    """A config field overridable by the upstream environment variable `name` (e.g. NUM_LAYERS)."""
    return field(default=default, metadata={"env": name})
