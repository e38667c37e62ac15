"""`pgolf compare`: per-seed table, mean and std, and the record rule of SPEC §1.5.

The rule is stated in nats per token: beat the comparison by ≥ 0.005 nats at p < 0.01. Scores
given in BPB are converted to nats with the runs' own tokens-per-byte ratio (the same
validation set), and every nat figure is also shown in BPB.
"""

from __future__ import annotations

import math
from pathlib import Path

from pgolf import rundir
from pgolf.audit.stats import mean_std, t_sf, welch_t_test
from pgolf.errors import PgolfError

MARGIN_NATS = 0.005
ALPHA = 0.01
ROW_KEYS = ("val_loss", "val_bpb", "bytes_total", "steps", "train_time_s", "eval_time_s")


def _config_without_seed(cfg) -> dict:
    data = cfg.to_dict()
    data["train"] = {k: v for k, v in data["train"].items() if k != "seed"}
    return data


def load_seed_runs(runs: list[str | Path], same_config: bool = True) -> list[dict]:
    """One row per run; refuses runs whose configs differ other than by seed, or repeat a seed."""
    rows, first = [], None
    for run in runs:
        cfg, report = rundir.load_evaluated(Path(run))
        if same_config:
            mine = _config_without_seed(cfg)
            if first is None:
                first = (run, mine)
            elif mine != first[1]:
                diff = sorted(
                    f"{section}.{key}"
                    for section in mine
                    if isinstance(mine[section], dict)
                    for key in mine[section]
                    if mine[section][key] != first[1].get(section, {}).get(key)
                )
                raise PgolfError(
                    f"{run}: config differs from {first[0]} beyond the seed ({', '.join(diff)})"
                )
        row = {"run": str(run), "seed": cfg.train.seed}
        row.update({k: report.get(k) for k in ROW_KEYS})
        row["tokens_per_byte"] = report["val_tokens"] / report["val_bytes"]
        rows.append(row)
    seeds = [r["seed"] for r in rows]
    if same_config and len(set(seeds)) != len(seeds):
        raise PgolfError(f"the same seed appears twice ({seeds}): each run must be a new seed")
    return rows


def _parse_against(against: list[str]) -> tuple[list[float] | None, list[str] | None]:
    numbers = []
    for item in against:
        try:
            numbers.append(float(item))
        except ValueError:
            return None, against
    return numbers, None


def compare(runs: list[str | Path], against: list[str] | None = None) -> dict:
    if not runs:
        raise PgolfError("compare needs at least one run")
    rows = load_seed_runs(runs)
    tokens_per_byte = sum(r["tokens_per_byte"] for r in rows) / len(rows)
    nats_to_bpb = tokens_per_byte / math.log(2)
    losses = [float(r["val_loss"]) for r in rows]
    mean_loss, std_loss = mean_std(losses)
    bpbs = [float(r["val_bpb"]) for r in rows]
    mean_bpb, std_bpb = mean_std(bpbs)
    result = {
        "runs": rows,
        "n": len(rows),
        "val_loss_mean": mean_loss,
        "val_loss_std": std_loss,
        "val_bpb_mean": mean_bpb,
        "val_bpb_std": std_bpb,
        "comparison": None,
    }
    if not against:
        return result
    scores, against_runs = _parse_against(against)
    if scores is not None:
        # BPB → nats with the runs' own tokens per byte: the same validation bytes
        other = [s / nats_to_bpb for s in scores]
        source = {"kind": "bpb_scores", "val_bpb": scores}
    else:
        other_rows = load_seed_runs(against_runs, same_config=False)
        other = [float(r["val_loss"]) for r in other_rows]
        source = {"kind": "runs", "runs": other_rows}
    try:
        plain = welch_t_test(losses, other)
        margin = welch_t_test(other, losses, margin=MARGIN_NATS)
    except ValueError as exc:
        raise PgolfError(f"compare: {exc} (give ≥ 2 runs or ≥ 2 comparison scores)") from None
    mean_other, std_other = mean_std(other)
    improvement = mean_other - mean_loss  # positive: these runs are better (lower loss)
    # One-sided: is the improvement larger than the 0.005-nat margin?
    p_margin = t_sf(margin.t, margin.df) if margin.standard_error else float(margin.t <= 0)
    result["comparison"] = {
        **source,
        "n": len(other),
        "val_loss_mean": mean_other,
        "val_loss_std": std_other,
        "val_bpb_mean": mean_other * nats_to_bpb,
        "improvement_nats": improvement,
        "improvement_bpb": improvement * nats_to_bpb,
        "margin_nats": MARGIN_NATS,
        "margin_bpb": MARGIN_NATS * nats_to_bpb,
        "welch_t": plain.t,
        "welch_df": plain.df,
        "p_two_sided": plain.p_two_sided,
        "t_margin": margin.t,
        "p_margin_one_sided": p_margin,
        "alpha": ALPHA,
        "record": improvement >= MARGIN_NATS and p_margin < ALPHA,
    }
    return result


def format_compare(result: dict) -> str:
    lines = [f"{'seed':>6}  {'val_loss':>10}  {'val_bpb':>10}  {'bytes_total':>12}  run"]
    for r in result["runs"]:
        lines.append(
            f"{r['seed']:>6}  {r['val_loss']:>10.6f}  {r['val_bpb']:>10.6f}  "
            f"{r['bytes_total'] or 0:>12,}  {r['run']}"
        )
    lines.append(
        f"{'mean':>6}  {result['val_loss_mean']:>10.6f}  {result['val_bpb_mean']:>10.6f}"
        f"  (n={result['n']}, std {result['val_loss_std']:.6f} nats / "
        f"{result['val_bpb_std']:.6f} bpb)"
    )
    c = result["comparison"]
    if c:
        lines.append(
            f"against {c['kind']} (n={c['n']}): mean {c['val_loss_mean']:.6f} nats = "
            f"{c['val_bpb_mean']:.6f} bpb"
        )
        lines.append(
            f"improvement {c['improvement_nats']:+.6f} nats ({c['improvement_bpb']:+.6f} bpb); "
            f"Welch t {c['welch_t']:.4f}, df {c['welch_df']:.3f}, p {c['p_two_sided']:.3g}"
        )
        lines.append(
            f"record rule: ≥ {c['margin_nats']} nats ({c['margin_bpb']:.5f} bpb) at p < "
            f"{c['alpha']}: one-sided p {c['p_margin_one_sided']:.3g} → "
            + ("MET" if c["record"] else "not met")
        )
    return "\n".join(lines)
