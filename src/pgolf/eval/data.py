"""What an evaluation reads: the validation tokens and what counts their bytes.

One place for the whole chain (dataset check → tokens → byte tables or CaseOps sidecar → their
torch form), so the eval stage and the in-training check load validation data the same way.
"""

from __future__ import annotations

import torch

from pgolf.config import RunConfig
from pgolf.data.caseops import load_byte_sidecar
from pgolf.data.dataset import DatasetFiles, check_dataset
from pgolf.data.shards import load_tokens
from pgolf.data.tokenizer import build_byte_tables
from pgolf.eval.bpb import SidecarBytes, TorchByteTables


class EvalData:
    """Validation tokens and what counts their bytes, checked against the model.

    That is the tokenizer's byte tables, or for a CaseOps dataset its byte sidecar of original
    bytes per token (`pgolf.data.caseops`).
    """

    def __init__(self, cfg: RunConfig, files: DatasetFiles, device: torch.device):
        sp = check_dataset(files, cfg.data, cfg.model.vocab_size, splits=("val",))
        tokens = load_tokens(files.val)
        self.covers_all = not cfg.eval.max_val_tokens or cfg.eval.max_val_tokens >= len(tokens)
        self.tokens = tokens[: cfg.eval.max_val_tokens] if cfg.eval.max_val_tokens else tokens
        tables = build_byte_tables(sp, cfg.model.vocab_size)
        self.byte_tables_sha256 = tables.sha256()  # compared by `pgolf audit`
        sidecar = load_byte_sidecar(files.val)
        self.byte_tables = (
            TorchByteTables(tables, device)
            if sidecar is None
            else SidecarBytes(sidecar[: len(self.tokens)], device)
        )
