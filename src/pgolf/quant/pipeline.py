"""The quantize stage in three calls, for run.py / `pgolf quantize RUN`:

    hessians, calib = calibrate(model, cfg, files, world)      # reads training data: timed
    code = code_budget(cfg)                                    # (bytes, where they came from)
    report = quantize_and_pack(model, cfg.quant, hessians, code, RUN / "artifact.pgolf")

`calibrate` is the only part that reads training data, so its seconds (`calib_time_s`) belong to
the training budget (SPEC §1.3); everything in `quantize_and_pack` touches no data.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from pgolf import rules
from pgolf.artifact.container import write_sections
from pgolf.config import RunConfig
from pgolf.data.dataset import DatasetFiles
from pgolf.dist import World
from pgolf.errors import PgolfError
from pgolf.quant import calibration
from pgolf.quant.config import QuantConfig
from pgolf.quant.fit import artifact_report, default_target_bytes, fit_to_budget
from pgolf.quant.hessian import HessianCollector, collect_hessians
from pgolf.quant.policy import plan_tensors
from pgolf.quant.quantize import parameter_roles, quantize_model

CALIB_SOURCES = ("train", "selfgen")


def hessian_names(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Tensors whose quantisation uses a Hessian (GPTQ or Hessian-aware SDClip)."""
    plans = plan_tensors(model.state_dict(), parameter_roles(model), cfg)
    capturable = set(HessianCollector(model).names)
    return [
        n
        for n, p in plans.items()
        if n in capturable
        and p.scheme == "int"
        and (p.gptq or (p.clip is not None and p.clip.method == "hsdclip"))
    ]


def calibrate(
    model: nn.Module,
    cfg: RunConfig,
    files: DatasetFiles | None,
    world: World,
    loader=None,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Hessians for every GPTQ tensor; `loader` continues the trainer's stream if given."""
    ex = cfg.quant
    names = hessian_names(model, ex)
    info = {"calib_source": ex.calib_source, "calib_time_s": 0.0, "calib_batches": 0}
    if not names:
        info["calib_source"] = "none"
        return {}, info
    if ex.calib_source not in CALIB_SOURCES:
        raise PgolfError(f"quant.calib_source {ex.calib_source!r}: expected one of {CALIB_SOURCES}")
    t0 = time.perf_counter()
    if ex.calib_source == "train":
        if loader is None and files is None:
            raise PgolfError("calibration from training data needs the dataset's training shards")
        batches = calibration.train_batches(
            loader if loader is not None else files.train,
            ex.calib_batches,
            ex.calib_batch_tokens or cfg.train.train_batch_tokens,
            cfg.train.train_seq_len,
            rank=world.rank,
            world_size=world.world_size,
            device=world.device,
            val_paths=files.val if files is not None else (),
        )
        info["calib_batches"] = ex.calib_batches
    else:
        # 0 follows the training length, as S1019 generates TRAIN_SEQ_LEN tokens per sequence.
        length = ex.selfgen_len or cfg.train.train_seq_len
        # Sampled in full before any Hessian is collected, as S1019 does: collecting while the
        # generator runs would also take in every decoding step's inputs (one position each,
        # under bf16 autocast on CUDA) and count each position twice.
        batches = calibration.self_generated(
            model,
            ex.selfgen_seqs,
            length,
            vocab_size=cfg.model.vocab_size,
            temperature=ex.selfgen_temperature,
            seed=cfg.train.seed,
            batch_size=ex.selfgen_batch,
            context=ex.selfgen_context,
            device=world.device,
        )
        batches = list(batches)
        info["calib_batches"] = -(-ex.selfgen_seqs // ex.selfgen_batch)
        info["selfgen_len"] = length
    hessians = collect_hessians(
        model,
        batches,
        names,
        all_reduce=ex.calib_all_reduce,
        progress=progress and world.is_main,
        total=info["calib_batches"],
    )
    if world.is_cuda:
        torch.cuda.synchronize(world.device)
    info["calib_time_s"] = time.perf_counter() - t0
    info["hessians"] = len(hessians)
    return hessians, info


def code_budget(cfg: RunConfig) -> tuple[int, str]:
    """The code bytes the fit target leaves room for (SPEC §1.2), and where that figure came from.

    The shipped train_gpt.py, as report.json's `bytes_code` counts it; a record preset may
    declare its own script's size instead (`quant.code_bytes`), to fit that record's budget.
    """
    if cfg.quant.code_bytes > 0:
        return cfg.quant.code_bytes, "quant.code_bytes (declared size of the record's script)"
    return rules.shipped_code_bytes(cfg.to_dict())


def quantize_and_pack(
    model: nn.Module,
    cfg: QuantConfig,
    hessians: dict[str, torch.Tensor],
    code: tuple[int, str],
    path: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Quantise, fit under the byte target, write the artifact (if `path`); return the report.

    `code` is (code bytes, their source) as `code_budget` gives them.
    """
    code_bytes, code_source = int(code[0]), code[1]
    target = cfg.target_bytes or default_target_bytes(code_bytes)
    model = model.to("cpu")
    qm = quantize_model(model, cfg, hessians, progress=progress)
    packed, fit = fit_to_budget(qm, target, cfg.compressor, cfg.fit_prune, hessians)
    if path is not None:
        write_sections(path, packed)
    report = artifact_report(qm, packed, fit)
    report["code_bytes"] = code_bytes
    report["code_bytes_source"] = code_source
    report["target_bytes_source"] = (
        "quant.target_bytes" if cfg.target_bytes else f"{rules.BYTES_CAP:,} − code_bytes"
    )
    report["bytes_total"] = len(packed.data) + code_bytes
    return report


def fit_log_lines(report: dict) -> list[str]:
    """train.log lines for the byte budget the fitter used and any codec it switched."""
    target = report["target_bytes"]
    if report["target_bytes_source"] == "quant.target_bytes":
        lines = [f"fit target {target:,} model bytes (quant.target_bytes)"]
    else:
        lines = [
            f"fit target {target:,} = {rules.BYTES_CAP:,} − {report['code_bytes']:,} code bytes "
            f"({report['code_bytes_source']})"
        ]
    switch = report.get("codec_switched")
    if switch:
        lines.append(f"codec switched {switch['from']} → {switch['to']}: {switch['why']}")
    return lines
