"""The one verdict vocabulary of pgolf's compliance records: "pass", "fail" or "unproven".

"unproven" means the records cannot show a rule either way. Timings are the main case: a time
measured on other hardware than 8×H100 proves nothing about the 8×H100 budget, under the cap or
over it. `pgolf audit` prints the status; report.json's compliance entries carry it as `status`
beside `ok`; submission.json and the export README use it too, where `ok` and the
submission.json booleans are true (pass), false (fail) or null (unproven).

The timing verdicts are computed here from report.json fields alone, so the run's own record,
the audit and the export cannot disagree about them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

PASS, FAIL, UNPROVEN = "pass", "fail", "unproven"
TIME_CAP_S = 600.0
# audit rule name → the report.json / submission.json compliance key of the same rule
REPORT_KEYS = {
    "artifact_bytes": "artifact_under_16mb",
    "training_time": "training_under_600s",
    "eval_time": "eval_under_600s",
}


def ok_of(status: str) -> bool | None:
    return {PASS: True, FAIL: False}.get(status)


def status_of(entry: dict) -> str:
    """The status of a report.json compliance entry (reports before `status` have `ok` only)."""
    if "status" in entry:
        return entry["status"]
    return {True: PASS, False: FAIL}.get(entry.get("ok"), UNPROVEN)


def combined(statuses: Iterable[str]) -> str:
    """Over several seeds: any fail fails, else any unproven leaves it unproven."""
    statuses = set(statuses)
    return FAIL if FAIL in statuses else UNPROVEN if UNPROVEN in statuses else PASS


def _time_verdict(seconds: float, what: str, device: str, world_size) -> dict:
    hardware = f"{world_size}×{device}"
    detail = f"{seconds:.1f} s {what} (cap {TIME_CAP_S:g} s)"
    if math.isnan(seconds):
        status, detail = UNPROVEN, f"{what}: not recorded"
    elif not (str(device).startswith("cuda") and world_size == 8):
        status = UNPROVEN
        detail += f", measured on {hardware}: this does not prove the 8×H100 budget"
    elif seconds <= TIME_CAP_S:
        status = PASS
        detail += f" on {hardware} (GPU model not recorded: check it is H100 SXM)"
    else:
        status = FAIL
        detail += f" on {hardware}"
    return {"status": status, "detail": detail, "seconds": seconds, "hardware": hardware}


def time_verdicts(report: dict) -> dict[str, dict]:
    """`training_time` and `eval_time` (audit names) from a report's recorded seconds."""
    # Calibration that reads training data is training (SPEC §1.3).
    from_train = (report.get("calibration") or {}).get("calib_source") == "train"
    calib_s = float(report.get("calib_time_s") or 0.0) if from_train else 0.0
    train_s = float(report.get("train_time_s", math.nan)) + calib_s
    eval_s = float(report.get("eval_time_s", math.nan))
    device, world_size = report.get("device"), report.get("world_size")
    return {
        "training_time": _time_verdict(
            train_s, f"training incl. {calib_s:.1f} s train-data calibration", device, world_size
        ),
        "eval_time": _time_verdict(
            eval_s,
            "from artifact load to the last score",
            report.get("eval_device", device),
            report.get("eval_world_size", world_size),
        ),
    }
