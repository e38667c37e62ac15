"""Submission export: the records folder of SPEC §1.6 and its single-file train_gpt.py."""
