"""Reproducible builds of quantized LLM releases: spec -> lock -> content-hashed artifact."""

__version__ = "0.1.0"
