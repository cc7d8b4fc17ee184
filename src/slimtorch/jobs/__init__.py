"""Pipelines: calibrate, apply, evaluate, save, report. The CLI and the benchmarks call these; they never
call the CLI."""
