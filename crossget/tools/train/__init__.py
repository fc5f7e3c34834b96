"""Training commands: cross tokens, the default CLIP, BLIP and LLaVA models."""
