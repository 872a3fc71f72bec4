"""Scorer fine-tuning: mask-scoring data (Ray Data), the Ray Train loop, export of a vLLM-loadable folder."""
