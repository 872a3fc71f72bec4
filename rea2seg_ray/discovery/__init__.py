"""Stage one of Rea2Seg: MLLM attention maps -> SAM prompts -> de-duplicated candidates (no Ray here)."""
