"""Quantization arithmetic, calibration, GPTQ and evaluation (torch)."""
