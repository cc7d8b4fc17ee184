"""Quantization-aware training: ``prepare_qat(model, plan, method)``, ``train_qat(...)``, ``convert(model)``."""

from slimtorch.qat.prepare import METHODS, convert, prepare_qat, qat_plan
from slimtorch.qat.train import TrainConfig, train_qat

__all__ = ["METHODS", "TrainConfig", "convert", "prepare_qat", "qat_plan", "train_qat"]
