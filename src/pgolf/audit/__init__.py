"""Rule checks over a run directory → one verdict per rule, and multi-seed statistics.

Verdicts come from the run's own records (report.json, config.json, metrics.jsonl, the artifact
on disk) and from dynamic probes on the artifact model; never from reading source text.
"""
