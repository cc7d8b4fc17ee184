"""Quantization-aware training: ``prepare_qat(model, plan, method)``, then train with
``slimtorch.distill.train_student``, then ``convert(model)``; the methods as objects in ``qat.methods``."""

from slimtorch.qat.prepare import METHODS, convert, prepare_qat, qat_plan

__all__ = ["METHODS", "convert", "prepare_qat", "qat_plan"]
