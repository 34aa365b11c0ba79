"""Inference: loading a trained workdir's params-only artifacts (loading.py) and routed
generation (generate.py). Reads what training wrote on disk, never training's code."""
