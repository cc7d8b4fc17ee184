"""Distillation: the student/teacher trainer and its losses (logits and features). QAT trains through it;
pruning recovery and step distillation will too."""

from slimtorch.distill.losses import FeatureTaps, feature_loss, kd_loss
from slimtorch.distill.trainer import TrainConfig, train_student

__all__ = ["FeatureTaps", "TrainConfig", "feature_loss", "kd_loss", "train_student"]
