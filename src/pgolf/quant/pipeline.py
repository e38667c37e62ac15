"""The quantize stage in three calls, for run.py / `pgolf quantize RUN`:

    hessians, calib = calibrate(model, cfg, files, world)      # reads training data: timed
    code = code_budget(cfg)                                    # (bytes, where they came from)
    report = export_mixed(model, cfg.export, hessians, code, RUN / "artifact.pgolf")

`calibrate` is the only part that reads training data, so its seconds (`calib_time_s`) belong to
the training budget (SPEC §1.3); everything in `export_mixed` touches no data.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import torch
from torch import nn

import pgolf
from pgolf import runlog
from pgolf.artifact.config import ExportConfig
from pgolf.artifact.container import write_sections
from pgolf.config import RunConfig
from pgolf.data.dataset import DatasetFiles
from pgolf.dist import World
from pgolf.errors import PgolfError
from pgolf.quant import calibration
from pgolf.quant.export import parameter_roles, quantize_model
from pgolf.quant.fit import artifact_report, default_target_bytes, fit_to_budget
from pgolf.quant.hessian import HessianCollector, collect_hessians
from pgolf.quant.policy import plan_tensors

CALIB_SOURCES = ("train", "selfgen")
CODE_MEASURES = ("imported", "exported", "exported-lzma")


def hessian_names(model: nn.Module, cfg: ExportConfig) -> list[str]:
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
    ex = cfg.export
    names = hessian_names(model, ex)
    info = {"calib_source": ex.calib_source, "calib_time_s": 0.0, "calib_batches": 0}
    if not names:
        info["calib_source"] = "none"
        return {}, info
    if ex.calib_source not in CALIB_SOURCES:
        raise PgolfError(
            f"export.calib_source {ex.calib_source!r}: expected one of {CALIB_SOURCES}"
        )
    clock = [0.0]
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
        info["calib_batches"] = -(-ex.selfgen_seqs // ex.selfgen_batch)
        info["selfgen_len"] = length
    hessians = collect_hessians(
        model,
        calibration.timed(batches, clock),
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

    A record preset declares its own script's size: that is what would ship, whereas the pgolf
    files a run imports are ~340 KB and would squeeze the model by as much.
    """
    ex = cfg.export
    if ex.code_bytes > 0:
        return ex.code_bytes, "export.code_bytes (declared size of the record's script)"
    if ex.code_measure not in CODE_MEASURES:
        raise PgolfError(
            f"export.code_measure {ex.code_measure!r}: expected one of {CODE_MEASURES}"
        )
    files = runlog.imported_source_files()
    # Inside an exported train_gpt.py every pgolf module's __file__ is the script (bundle.py),
    # so the imported files already are the shipped script.
    if Path(pgolf.__file__).name != "__init__.py":
        return runlog.code_bytes(files), "this exported script"
    if ex.code_measure == "imported":
        return runlog.code_bytes(files), (
            f"the {len(files)} pgolf source files this run imported (export.code_bytes undeclared)"
        )
    # Imported by name, not by an import statement: bundle.py embeds every module such a
    # statement reaches, and an exported script (handled above) never needs the exporter.
    bundle = importlib.import_module("pgolf.export.bundle")
    script = bundle.bundle_script(cfg.to_dict())
    if ex.code_measure == "exported-lzma":
        return len(bundle.compress_script(script).encode("utf-8")), "exported script, lzma-wrapped"
    return len(script.encode("utf-8")), "exported script"


def export_mixed(
    model: nn.Module,
    cfg: ExportConfig,
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
        "export.target_bytes" if cfg.target_bytes else "16,000,000 − code_bytes"
    )
    report["bytes_total"] = len(packed.data) + code_bytes
    return report


def fit_log_lines(report: dict) -> list[str]:
    """train.log lines for the byte budget the fitter used and any codec it switched."""
    target = report["target_bytes"]
    if report["target_bytes_source"] == "export.target_bytes":
        lines = [f"fit target {target:,} model bytes (export.target_bytes)"]
    else:
        lines = [
            f"fit target {target:,} = 16,000,000 − {report['code_bytes']:,} code bytes "
            f"({report['code_bytes_source']})"
        ]
    switch = report.get("codec_switched")
    if switch:
        lines.append(f"codec switched {switch['from']} → {switch['to']}: {switch['why']}")
    return lines
