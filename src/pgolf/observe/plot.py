"""`pgolf plot RUN… --out FILE.png`: one figure comparing runs — loss curves, BPB, quant gap, bytes.

Headless by construction (the Agg backend, chosen before pyplot is imported), so it works over
SSH, in CI and on the training box. matplotlib is imported only here, so training never needs it.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

from pgolf.errors import PgolfError
from pgolf.observe.runs import RunRecords, artifact_bytes_per_class, load_run

PANELS = (
    "loss vs step",
    "train loss vs training time",
    "val_bpb per eval mode",
    "quant gap",
    "artifact bytes per class",
    "grad norm before clipping",
)
# One colour per quantization class in every plot: tab20's dark/light pairs, the dark one for
# integer storage, the light one for float copies; classes not listed get a pair by name.
CLASS_PAIRS = {"embed": 0, "attn": 1, "mlp": 2, "head": 3, "matrix": 4, "table": 5, "scalar": 6}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PgolfError('pgolf plot needs matplotlib: pip install "pgolf[plot]"') from None
    matplotlib.use("Agg")  # no display needed; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _zoomed_ylim(ax, values: list[float], pad_frac: float = 0.25) -> None:
    # BPB differences between runs are often in the third decimal; bars from 0 would hide them.
    lo, hi = min(values), max(values)
    pad = (hi - lo) * pad_frac or abs(hi) * 0.01 or 0.01
    ax.set_ylim(lo - pad, hi + 2 * pad)


def _empty(ax, message: str) -> None:
    # Runs still training have no score or artifact yet: say so instead of drawing a 0–1 grid.
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="dimgray")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_runs(run_dirs: list[str | Path], out: str | Path, title: str | None = None) -> dict:
    """Render the comparison figure to `out` (PNG); return what was plotted."""
    if not run_dirs:
        raise PgolfError("pgolf plot needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    plt = _pyplot()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {r.path: colors[i % len(colors)] for i, r in enumerate(runs)}
    fig, grid = plt.subplots(2, 3, figsize=(17, 9.5))
    axes = grid.ravel()
    for ax, panel in zip(axes, PANELS, strict=True):
        ax.set_title(panel, fontsize=11)
        ax.grid(alpha=0.3)
    # The validation curve exists only when the runs set train.val_loss_every (off by default).
    has_val = any(run.val_curve for run in runs)
    axes[0].set_title(
        PANELS[0] + (" (validation dashed)" if has_val else ": train only (no val_loss_every)"),
        fontsize=11,
    )

    summary: dict[str, Any] = {"runs": [], "out": str(out), "axes": len(axes), "titles": []}
    for run in runs:
        steps = [r["step"] for r in run.steps]
        loss = [r["train_loss"] for r in run.steps]
        style = {"color": color[run.path], "label": run.name, "lw": 1.4}
        if len(steps) < 30:
            style["marker"] = "o"  # sparse logging: show where the points are
        axes[0].plot(steps, loss, **style)
        if run.steps and "train_time_ms" in run.steps[0]:
            axes[1].plot([r["train_time_ms"] / 1000 for r in run.steps], loss, **style)
        norms = [(r["step"], r["grad_norm"]) for r in run.steps if r.get("grad_norm") is not None]
        if norms:
            axes[5].plot(*zip(*norms, strict=True), **style)
        if run.val_curve:
            # Same units (nats/token) as the training loss; dashed with markers to tell them apart.
            val_style = {"color": color[run.path], "ls": "--", "marker": "s", "ms": 4, "lw": 1.0}
            val_steps = [r["step"] for r in run.val_curve]
            val_loss = [r["val_loss"] for r in run.val_curve]
            axes[0].plot(val_steps, val_loss, label=f"{run.name} (val)", **val_style)
        summary["runs"].append(
            {
                "run": str(run.path),
                "steps": len(run.steps),
                "val_points": len(run.val_curve),
                "bpb": run.bpb_by_mode(),
                "quant_gap": run.quant_gap(),
            }
        )
    for ax, xlabel, ylabel in (
        (axes[0], "step", "loss (nats/token)"),
        (axes[1], "training time (s)", "train loss (nats/token)"),
        (axes[5], "step", "global grad norm"),
    ):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    _bpb_panel(axes[2], runs, color)
    _gap_panel(axes[3], runs, color)
    summary["bytes_source"] = _bytes_panel(axes[4], runs)
    summary["titles"] = [ax.get_title() for ax in axes]
    fig.suptitle(title or "pgolf runs: " + ", ".join(r.name for r in runs), fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return summary


def _bpb_panel(ax, runs: list[RunRecords], color: dict) -> None:
    by_run = [run.bpb_by_mode() for run in runs]
    # pre_quant first: reading left to right follows the pipeline (float → artifact → TTT).
    modes = sorted({m for b in by_run for m in b}, key=lambda m: (m != "pre_quant", m))
    if not modes:
        _empty(ax, "no evaluation yet")
        return
    width = 0.8 / len(runs)
    values = []
    for i, (run, bpb) in enumerate(zip(runs, by_run, strict=True)):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j, m in enumerate(modes) if m in bpb]
        ys = [bpb[m] for m in modes if m in bpb]
        values += ys
        bars = ax.bar(xs, ys, width * 0.9, color=color[run.path], label=run.name)
        ax.bar_label(bars, fmt="%.4f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("val_bpb (axis not from 0)")
    _zoomed_ylim(ax, values, pad_frac=0.6)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.legend(fontsize=8)


def _gap_panel(ax, runs: list[RunRecords], color: dict) -> None:
    gaps = [(run, run.quant_gap()) for run in runs]
    done = [(run, g) for run, g in gaps if g is not None]
    if not done:
        _empty(ax, "no quantized eval yet")
        return
    # Milli-BPB: gaps range from 1e-5 (int8 of a tiny model) to 1e-2 (int5), and a bare BPB axis
    # would print them all as ±0.0000 or hide them in a ×1e−5 offset.
    gaps_mbpb = [1000 * g for _, g in done]
    bars = ax.bar(
        [run.name for run, _ in done], gaps_mbpb, color=[color[run.path] for run, _ in done]
    )
    ax.bar_label(bars, labels=[f"{g:+.3g}" for g in gaps_mbpb], fontsize=8, padding=2)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("val_bpb − pre_quant_val_bpb (milli-BPB)")
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    lo, hi = min(0.0, *gaps_mbpb), max(0.0, *gaps_mbpb)
    pad = (hi - lo) * 0.2 or 0.001
    ax.set_ylim(lo - pad, hi + pad)
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)


def class_color(label: str) -> tuple[float, ...]:
    """The colour of a bytes-per-class label ("mlp (int8)", "scalar (float)", "attn", ...)."""
    import matplotlib

    base, _, storage = label.partition(" ")
    pair = CLASS_PAIRS.get(base, 7 + zlib.crc32(base.encode()) % 3)
    light = any(word in storage for word in ("fp16", "float", "raw"))
    return matplotlib.colormaps["tab20"](2 * pair + light)


def _bytes_panel(ax, runs: list[RunRecords]) -> dict[str, str | None]:
    # By position, not name: two runs may share a directory name (e.g. seed dirs in two sweeps).
    split = [artifact_bytes_per_class(run) for run in runs]
    sources = {str(run.path): (s[1] if s else None) for run, s in zip(runs, split, strict=True)}
    classes = sorted({c for s in split if s for c in s[0]})
    if not classes:
        _empty(ax, "no artifact yet")
        return sources
    names = [run.name for run in runs]
    left = [0.0] * len(names)
    for cls in classes:
        widths = [s[0].get(cls, 0.0) if s else 0.0 for s in split]
        ax.barh(range(len(names)), widths, left=left, label=cls, color=class_color(cls))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for y, total in enumerate(left):
        ax.text(total, y, f" {total / 1e6:.3f} MB", va="center", fontsize=8)
    ax.set_xlim(0, max(left) * 1.2 if max(left) > 0 else 1)
    ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1e6:g}")
    ax.set_xlabel("MB (decimal: 16 MB cap = 16,000,000 bytes)")
    if any(s == "int8 artifact header" for s in sources.values()):
        ax.set_xlabel(
            ax.get_xlabel() + "\nint8 + zlib: the file's bytes split by each group's raw bytes"
        )
    # Below the bars, clear of them and of the grad-norm panel to the right.
    ax.legend(
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.22),
        ncol=3,
        title="class (storage)",
        title_fontsize=8,
    )
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()  # first run on top, as in the other panels' legends
    return sources
