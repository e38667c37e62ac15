"""The pipeline stages over a run directory (its files: pgolf.rundir), and `pgolf run` which
chains them. The compliance record the eval stage writes is pgolf.rules'.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import torch

import pgolf
from pgolf import rules, rundir
from pgolf.artifact.container import write_artifact
from pgolf.artifact.int8 import quantize_state_dict_int8
from pgolf.artifact.load import load_artifact_model
from pgolf.config import RunConfig
from pgolf.data.dataset import check_dataset, resolve_dataset
from pgolf.dist import World, barrier
from pgolf.errors import PgolfError
from pgolf.eval.data import EvalData
from pgolf.eval.evaluate import eval_window_length, evaluate
from pgolf.eval.normalisation import normalisation_probe
from pgolf.eval.prequant import prequant_ttt
from pgolf.eval.request import (
    EvalRequest,
    changed_settings,
    describe_request,
    resolve_eval_request,
)
from pgolf.eval.score import score_nonoverlapping
from pgolf.fileio import remove_empty_dirs, writable_dir
from pgolf.model.gpt import GPT
from pgolf.observe.sinks import open_sinks, require_sinks
from pgolf.quant.pipeline import calibrate, code_budget, fit_log_lines, quantize_and_pack
from pgolf.runlog import RunLog
from pgolf.safetensors_io import load_safetensors
from pgolf.train.trainer import Trainer

QUANT_CODECS = ("int8-zlib", "mixed")
# The small part of the quantizer report that goes into report.json (the rest: quant_report.json)
QUANT_SUMMARY_KEYS = (
    "bytes_per_class",
    "int_values_bytes",
    "int_values_entropy_bytes",
    "gptq_fallbacks",
    "quant_error",
    "quantize_time_s",
    "target_bytes",
    "target_bytes_source",
    "code_bytes",
    "code_bytes_source",
    "compressor",
    "codec_switched",
    "pruned",
)


# -- run directory ---------------------------------------------------------------------------
def create_run_dir(
    run_dir: Path, cfg: RunConfig, world: World, overwrite: bool = False
) -> list[Path]:
    """Write RUN/config.json; returns the directories this made (for `discard_unstarted_run`)."""
    created: list[Path] = []
    if world.is_main:
        if (run_dir / rundir.CONFIG).exists() and not overwrite:
            raise PgolfError(
                f"{run_dir}: a run already exists here; use `pgolf train {run_dir} --resume` or "
                "choose another --out"
            )
        created = writable_dir(run_dir, "--out")
        rundir.write_json(run_dir / rundir.CONFIG, cfg.to_dict())
    barrier(world)
    return created


def discard_unstarted_run(run_dir: Path, created: list[Path], world: World) -> None:
    """Undo `create_run_dir` for a run that failed before its first training step.

    Its config.json would make the retry refuse ("a run already exists") while `--resume` has no
    checkpoint to go on, so nothing of it may stay. metrics.jsonl is written from step 1 on.
    """
    if not world.is_main or (run_dir / rundir.METRICS).exists():
        return
    if run_dir in created:  # ours alone: logs, sinks and all
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        for name in (rundir.CONFIG, rundir.TRAIN_LOG):
            (run_dir / name).unlink(missing_ok=True)
    remove_empty_dirs(created)


# -- evaluation during training ------------------------------------------------------------
def score_without_ttt(
    model: torch.nn.Module, cfg: RunConfig, data: EvalData, world: World, progress: bool = False
) -> dict:
    """The run's evaluation mode (non-overlapping or sliding) with test-time training off."""
    plain = dataclasses.replace(cfg.eval, ttt_enabled=False)
    return evaluate(
        model,
        data.tokens,
        data.byte_tables,
        plain,
        world,
        train_seq_len=cfg.train.train_seq_len,
        progress=progress,
    )


def periodic_validator(cfg: RunConfig, data: EvalData, world: World):
    """The in-training check of `train.val_loss_every`: non-overlapping, as the official loop.

    It watches the curve, so it is the cheap mode whatever the run's final eval mode is.
    """

    def validate(model: torch.nn.Module) -> dict:
        sums = score_nonoverlapping(
            model,
            data.tokens,
            eval_window_length(cfg.eval, cfg.train.train_seq_len),
            cfg.eval.val_batch_tokens,
            data.byte_tables,
            world,
        )
        return {"val_loss": sums.loss, "val_bpb": sums.bpb}

    return validate


# -- stages ----------------------------------------------------------------------------------
def train_stage(
    run_dir: Path,
    world: World,
    resume: bool = False,
    echo: bool = True,
    allow_illegal: bool = False,
    loggers: tuple[str, ...] = (),
) -> dict:
    cfg = rundir.load_config(run_dir)
    files = resolve_dataset(cfg.data)
    # Every shard the loader may read, before the clock: a bad one must not surface mid-run.
    check_dataset(files, cfg.data, cfg.model.vocab_size, splits=("train",))
    log = RunLog(
        run_dir,
        world.is_main,
        echo,
        open_sinks(loggers, run_dir) if world.is_main and loggers else (),
    )
    eval_data = EvalData(cfg, files, world.device)
    trainer = Trainer(
        cfg, files, world, run_dir, log, validate=periodic_validator(cfg, eval_data, world)
    )
    log.header(cfg.to_dict(), str(world.device), world.world_size)
    result = trainer.run(resume=resume)
    extra = {}
    if cfg.eval.prequant_ttt_enabled:
        # Research only (SPEC §5.30): trains on validation tokens before they are scored.
        extra["prequant_ttt"] = prequant_ttt(
            trainer.model,
            eval_data.tokens,
            cfg.eval,
            world,
            seq_len=eval_window_length(cfg.eval, cfg.train.train_seq_len),
            allow_illegal=allow_illegal,
            progress=echo,
        )
        log.text(f"ILLEGAL pre-quant TTT on validation data: {extra['prequant_ttt']['reason']}")
        trainer.save_weights()
    pre = score_without_ttt(trainer.model, cfg, eval_data, world, progress=echo)
    log.metrics(
        step=result.steps, eval_mode="pre_quant", val_loss=pre["val_loss"], val_bpb=pre["val_bpb"]
    )
    log.text(
        f"stopped by {result.stopped_by} at step {result.steps}: train_time "
        f"{result.train_time_ms / 1000:.1f}s pre_quant val_loss {pre['val_loss']:.4f} "
        f"val_bpb {pre['val_bpb']:.4f}"
    )
    return rundir.update_report(
        run_dir,
        world.is_main,
        steps=result.steps,
        stopped_by=result.stopped_by,
        tokens_seen=result.tokens_seen,
        final_train_loss=result.final_train_loss,
        train_time_s=result.train_time_ms / 1000,
        calib_time_s=0.0,
        pre_quant_val_loss=pre["val_loss"],
        pre_quant_val_bpb=pre["val_bpb"],
        seed=cfg.train.seed,
        world_size=world.world_size,
        device=str(world.device),
        pgolf_version=pgolf.__version__,
        config_sha256=cfg.sha256(),
        data_files=files.as_record(),
        **extra,
    )


def quantize_stage(run_dir: Path, world: World, echo: bool = True) -> dict:
    """Quantize the trained float weights and write the compressed artifact.

    `int8-zlib` is the official baseline int8 + zlib; `mixed` is pgolf.quant (GPTQ, per-role bits,
    fit-to-budget, per-section codecs). Calibration that reads training data is timed as
    `calib_time_s` and charged to the training budget.
    """
    cfg = rundir.load_config(run_dir)
    if cfg.quant.codec not in QUANT_CODECS:
        raise PgolfError(f"unknown quant.codec {cfg.quant.codec!r}; available: {QUANT_CODECS}")
    weights = Path(run_dir) / rundir.WEIGHTS
    if not weights.is_file():
        raise PgolfError(f"{weights}: no trained weights; run `pgolf train {run_dir}` first")
    artifact = Path(run_dir) / rundir.ARTIFACT
    fields: dict[str, Any] = {"codec": cfg.quant.codec}
    if cfg.quant.codec == "int8-zlib":
        if world.is_main:
            arrays, meta = quantize_state_dict_int8(load_safetensors(weights))
            write_artifact(artifact, arrays, {"format": cfg.quant.codec, **meta}, codec="zlib")
    else:
        model = GPT(cfg.model)
        model.load_state_dict(load_safetensors(weights), strict=True)
        model.to(world.device)
        files = resolve_dataset(cfg.data)
        hessians, calib = calibrate(model, cfg, files, world, progress=echo)
        fields["calib_time_s"] = calib["calib_time_s"]
        fields["calibration"] = {k: v for k, v in calib.items() if k != "calib_time_s"}
        if calib["calib_source"] == "train":  # the shards calibration may read, for the audit
            fields["calibration"]["files"] = [str(p.resolve()) for p in files.train]
        if world.is_main:
            quant = quantize_and_pack(
                model,
                cfg.quant,
                hessians,
                code_budget(cfg),
                artifact,
                progress=echo,
            )
            log = RunLog(run_dir, True, echo)
            for line in fit_log_lines(quant):
                log.text(line)
            rundir.write_json(Path(run_dir) / rundir.QUANT_REPORT, quant)
            fields["quant"] = {k: v for k, v in quant.items() if k in QUANT_SUMMARY_KEYS}
    barrier(world)
    fields["bytes_model"] = artifact.stat().st_size
    return rundir.update_report(run_dir, world.is_main, **fields)


def eval_stage(
    run_dir: Path,
    world: World,
    echo: bool = True,
    loggers: tuple[str, ...] = (),
    request: EvalRequest | None = None,
) -> dict:
    """Score the artifact model; everything from reading the artifact on is eval time.

    Under the run's own settings the result is report.json's headline and the report is returned.
    `request` may ask for others (`pgolf eval --stride/--ttt/--val/--set`): that result is
    appended to the report's `evaluations` and returned, the headline left as it was.
    """
    cfg = rundir.load_config(run_dir)
    files = resolve_dataset(cfg.data)
    request = request or EvalRequest()
    ev, eval_files = resolve_eval_request(cfg, files, request)
    own = ev == cfg.eval and eval_files.val == files.val
    artifact = Path(run_dir) / rundir.ARTIFACT
    if not artifact.is_file():
        raise PgolfError(f"{artifact}: no artifact; run `pgolf run` or `pgolf quantize` first")
    log = RunLog(
        run_dir,
        world.is_main,
        echo,
        open_sinks(loggers, run_dir) if world.is_main and loggers else (),
    )
    eval_data = EvalData(dataclasses.replace(cfg, eval=ev), eval_files, world.device)
    t0 = time.perf_counter()
    model = load_artifact_model(artifact, cfg.model, world.device)
    result = evaluate(
        model,
        eval_data.tokens,
        eval_data.byte_tables,
        ev,
        world,
        train_seq_len=cfg.train.train_seq_len,
        progress=echo,
        started_at=t0,
    )
    report = rundir.read_report(run_dir)
    cut = f"eval.max_val_tokens={ev.max_val_tokens} cut the stream"
    cut = None if eval_data.covers_all else cut
    bytes_code, _ = rules.shipped_code_bytes(cfg.to_dict())
    fields = dict(
        val_loss=result["val_loss"],
        val_bpb=result["val_bpb"],
        val_tokens=result["val_tokens"],
        val_bytes=result["val_bytes"],
        eval_mode=result["eval_mode"],
        eval_seq_len=result["eval_seq_len"],
        eval_stride=result["eval_stride"],
        coverage=result["coverage"],
        scorable_targets=result["scorable_targets"],
        ledger_targets=result["ledger_targets"],
        partial_reason="; ".join(filter(None, (result["partial_reason"], cut))) or None,
        eval_time_s=result["time"]["total_s"],
        eval_time=result["time"],
        eval_device=str(world.device),
        eval_world_size=world.world_size,
        bytes_code=bytes_code,
        bytes_total=bytes_code + int(report.get("bytes_model", 0)),
        ttt=result["ttt"],
        temperature=result["temperature"],
        byte_tables_sha256=eval_data.byte_tables_sha256,
    )
    if world.is_main:
        # C2 on the model just scored; a check, not scoring, so after the eval clock. One
        # process: the probe's scorer would split its single window over the ranks.
        fields["normalisation"] = normalisation_probe(
            model,
            eval_data.tokens,
            result["eval_seq_len"],
            ev.temperature,
            cfg.model.vocab_size,
            eval_data.byte_tables,
            dataclasses.replace(world, rank=0, world_size=1),
        )
    compliance = rules.compliance({**report, **fields}, cfg)
    score = (
        f"{result['eval_mode']} val_loss {result['val_loss']:.6f} val_bpb {result['val_bpb']:.6f}"
        + (" (score-first TTT, s_0)" if result["ttt"] else "")
    )
    if own:
        log.metrics(
            eval_mode=result["eval_mode"], val_loss=result["val_loss"], val_bpb=result["val_bpb"]
        )
        log.text(f"final artifact {score}")
        return rundir.update_report(run_dir, world.is_main, **fields, compliance=compliance)
    evaluations = list(report.get("evaluations", []))
    evaluation = {
        "evaluation": len(evaluations) + 1,
        "request": request.asked(),
        "settings": changed_settings(cfg.eval, ev),
        "val_files": [str(p.resolve()) for p in eval_files.val],
        **fields,
        "compliance": compliance,
    }
    # `evaluation` keeps this score apart from the run's own in readers of metrics.jsonl.
    log.metrics(
        eval_mode=result["eval_mode"],
        evaluation=evaluation["evaluation"],
        val_loss=result["val_loss"],
        val_bpb=result["val_bpb"],
    )
    asked = describe_request(evaluation["request"])
    log.text(f"evaluation {evaluation['evaluation']} ({asked}): {score}")
    rundir.update_report(run_dir, world.is_main, evaluations=[*evaluations, evaluation])
    return evaluation


def run_pipeline(
    run_dir: Path,
    cfg: RunConfig,
    world: World,
    echo: bool = True,
    allow_illegal: bool = False,
    loggers: tuple[str, ...] = (),
) -> dict:
    if loggers:  # a missing extra must not leave a half-made run directory behind
        require_sinks(loggers)
    created = create_run_dir(run_dir, cfg, world)
    try:
        train_stage(run_dir, world, echo=echo, allow_illegal=allow_illegal, loggers=loggers)
    except BaseException:
        discard_unstarted_run(run_dir, created, world)
        raise
    quantize_stage(run_dir, world, echo=echo)
    return eval_stage(run_dir, world, echo=echo, loggers=loggers)


def summary_rows(report: dict) -> list[tuple[str, str]]:
    def fmt(key: str, spec: str) -> str:
        value = report.get(key)
        return "—" if value is None else format(value, spec)

    # The headline score: the artifact decoded, in the run's eval mode, after TTT when it is on.
    mode = report.get("eval_mode", "?") + (" + TTT" if report.get("ttt") else "")
    return [
        (f"val_bpb ({report.get('codec', 'artifact')}, {mode})", fmt("val_bpb", ".4f")),
        ("pre-quant val_bpb", fmt("pre_quant_val_bpb", ".4f")),
        ("val_loss (nats/token)", fmt("val_loss", ".4f")),
        ("steps", fmt("steps", "d")),
        ("bytes_model", fmt("bytes_model", ",d")),
        ("bytes_code", fmt("bytes_code", ",d")),
        ("bytes_total", fmt("bytes_total", ",d")),
        ("train time (s)", fmt("train_time_s", ".1f")),
        ("eval time (s)", fmt("eval_time_s", ".1f")),
    ]


def evaluation_rows(evaluation: dict) -> list[tuple[str, str]]:
    """The table of one entry of report.json's `evaluations`."""
    mode = evaluation["eval_mode"] + (" + TTT" if evaluation["ttt"] else "")
    return [
        ("evaluation", f"{evaluation['evaluation']} in report.json's evaluations"),
        ("asked", describe_request(evaluation["request"])),
        (f"val_bpb ({mode}, T={evaluation['eval_seq_len']})", f"{evaluation['val_bpb']:.4f}"),
        ("val_loss (nats/token)", f"{evaluation['val_loss']:.4f}"),
        ("scored targets", f"{evaluation['val_tokens']:,}"),
        ("scored bytes", f"{evaluation['val_bytes']:,}"),
        ("eval time (s)", f"{evaluation['eval_time_s']:.1f}"),
    ]


def eval_rows(result: dict) -> list[tuple[str, str]]:
    """`pgolf eval`'s table: the report's summary, or the side evaluation it recorded."""
    return evaluation_rows(result) if "evaluation" in result else summary_rows(result)
