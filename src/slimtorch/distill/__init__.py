"""Distillation losses (logits and features) for recovering accuracy."""

from slimtorch.distill.losses import FeatureTaps, feature_loss, kd_loss

__all__ = ["FeatureTaps", "feature_loss", "kd_loss"]
