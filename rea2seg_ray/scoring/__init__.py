"""Stage two of Rea2Seg: render candidates, score them with a VLM (vLLM or transformers), rerank (no Ray here)."""
