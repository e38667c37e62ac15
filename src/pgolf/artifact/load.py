"""An artifact file back to the model it decodes to, whichever codec wrote it.

Evaluation and the audit load artifacts here, beside the container and the two formats
(`pgolf.artifact.int8`, `pgolf.artifact.mixed`): reading an artifact needs no quantizer.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor, nn

from pgolf.artifact import int8, mixed
from pgolf.artifact.container import read_artifact
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT


def dequantize_artifact(arrays: dict[str, np.ndarray], meta: dict) -> dict[str, Tensor]:
    """Either artifact format back to a float state dict (eval loads any artifact through this)."""
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt == int8.FORMAT:
        return int8.dequantize_state_dict_int8(arrays, meta)
    return mixed.dequantize_mixed(arrays, meta)


def load_artifact_model(
    path: str | os.PathLike, cfg: ModelConfig, device: torch.device
) -> nn.Module:
    """The model an artifact file decodes to, as the evaluation scores it."""
    arrays, meta = read_artifact(path)
    model = GPT(cfg)
    model.load_state_dict(dequantize_artifact(arrays, meta), strict=True)
    return model.to(device)
