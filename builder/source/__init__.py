"""Inputs of a build: source checkpoints (import, load) and calibration/eval text."""
