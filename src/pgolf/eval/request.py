"""`pgolf eval RUN --stride/--eval-len/--ttt/--val/--set`: other settings for a run's artifact.

A request starts from the run's own evaluation settings and changes only what it names, so a
request that names nothing (or only what the run already had) resolves to the run's settings,
and the pipeline then refreshes the headline score instead of recording a side result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pgolf.config import RunConfig, apply_overrides, load_preset, preset_names
from pgolf.data.dataset import DatasetFiles
from pgolf.data.shards import find_shards
from pgolf.errors import PgolfError
from pgolf.eval.config import EvalConfig, validate_eval_config

TTT_OFF = "off"


@dataclass(frozen=True)
class EvalRequest:
    """What was asked for; None / empty keeps the run's own setting."""

    stride: int | None = None  # sliding windows with this stride
    eval_len: int | None = None  # the window length T
    ttt: str | None = None  # a preset whose ttt_* settings to use (TTT on), or "off"
    val: str | None = None  # another validation set: a shard, a glob or a dataset directory
    assignments: tuple[str, ...] = ()  # eval.key=value, for anything else

    def asked(self) -> dict[str, Any]:
        """The flags that were given, for the record of the evaluation."""
        given = {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, ())}
        if "assignments" in given:
            given["assignments"] = list(given["assignments"])
        return given


def _ttt_settings(request: EvalRequest, ev: EvalConfig) -> None:
    if request.ttt == TTT_OFF:
        ev.ttt_enabled = False
        return
    if request.ttt not in preset_names():
        raise PgolfError(
            f"--ttt {request.ttt!r}: expected {TTT_OFF} or a preset name "
            f"({', '.join(preset_names())})"
        )
    preset = load_preset(request.ttt).eval
    if not preset.ttt_enabled:
        raise PgolfError(
            f"--ttt {request.ttt}: that preset has no test-time training (eval.ttt_enabled is "
            f"false); expected {TTT_OFF} or a TTT preset"
        )
    # Only the TTT settings: the windows stay the run's unless --stride / --eval-len say otherwise.
    for f in dataclasses.fields(ev):
        if f.name.startswith("ttt_"):
            setattr(ev, f.name, getattr(preset, f.name))


def resolve_eval_request(
    cfg: RunConfig, files: DatasetFiles, request: EvalRequest
) -> tuple[EvalConfig, DatasetFiles]:
    """The evaluation settings and validation shards `request` asks for, checked.

    Every flag is checked here, before the artifact is read or anything is written.
    """
    ev = dataclasses.replace(cfg.eval)
    if request.stride is not None:
        if request.stride < 1:
            raise PgolfError(f"--stride {request.stride}: expected a positive number of tokens")
        ev.eval_mode, ev.eval_stride = "sliding", request.stride
    if request.eval_len is not None:
        if request.eval_len < 1:
            raise PgolfError(f"--eval-len {request.eval_len}: expected a positive window length")
        ev.eval_seq_len = request.eval_len
    if request.ttt is not None:
        _ttt_settings(request, ev)
    for item in request.assignments:
        if not item.startswith("eval."):
            raise PgolfError(
                f"--set {item!r}: pgolf eval changes only eval.* settings (the artifact fixes "
                "the rest)"
            )
    # A scratch config carries the parsing and messages of `pgolf run --set`.
    ev = apply_overrides(RunConfig(eval=ev), list(request.assignments)).eval
    validate_eval_config(ev)
    window = ev.eval_seq_len or cfg.train.train_seq_len
    if ev.eval_mode == "sliding" and ev.eval_stride > window:
        raise PgolfError(
            f"eval stride {ev.eval_stride} exceeds the window {window}: expected --stride at "
            f"most {window}, or a longer --eval-len"
        )
    if request.val is not None:
        try:
            files = dataclasses.replace(files, val=find_shards(request.val, split="val"))
        except PgolfError as exc:
            raise PgolfError(f"--val {exc}") from None
    return ev, files


def changed_settings(run: EvalConfig, ev: EvalConfig) -> dict[str, Any]:
    """The evaluation settings that differ from the run's own, with their new values."""
    own = dataclasses.asdict(run)
    return {k: v for k, v in dataclasses.asdict(ev).items() if own[k] != v}


def describe_request(asked: dict[str, Any]) -> str:
    """`EvalRequest.asked()` in a few words, as the flags were given."""
    parts = [f"{k.replace('_', '-')}={v}" for k, v in asked.items() if k != "assignments"]
    return ", ".join(parts + list(asked.get("assignments", [])))
