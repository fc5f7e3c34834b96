"""Evaluations: CLIP retrieval, the BLIP tasks through one runner, LLaVA-1.5 in its own file formats."""
