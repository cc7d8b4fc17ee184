"""Calibration: seeded calibration sets, the layer-by-layer runner, and the PTQ algorithms."""
