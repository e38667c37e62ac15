"""Artifact settings: how the trained weights become the compressed submission."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExportConfig:
    codec: str = "int8-zlib"  # the official baseline export (SPEC §4.8)
