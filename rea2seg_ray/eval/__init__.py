"""Evaluation: metrics (gIoU/cIoU, top-k, oracle, per category) and reports."""
