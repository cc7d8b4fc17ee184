"""Evaluation: metrics (pure functions) and the per-task harness."""

from slimtorch.eval.harness import EvalResult, Metric, evaluate

__all__ = ["EvalResult", "Metric", "evaluate"]
