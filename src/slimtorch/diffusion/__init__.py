"""Diffusion models and their acceleration: noise schedules and samplers, FID on our own classifier's
features, cache schedules and their error correction (issue 21)."""
