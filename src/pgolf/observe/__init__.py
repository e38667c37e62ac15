"""Observability and results: metric sinks (TensorBoard, W&B), plots of runs, ablation tables."""
