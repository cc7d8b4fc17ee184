"""Sample quality on Fashion-MNIST, measured with our own classifier (the zoo's fmnist-cnn).

* FID-FMNIST: the Fréchet distance (:mod:`slimtorch.diffusion.fid`) between the classifier's penultimate
  features (the 128-d pooled output before its last linear) of generated and real images. Comparable between
  our own runs only, not with Inception FID.
* Class accuracy: the share of class-conditional samples that the classifier assigns to the class asked for.

Diffusion images are (N, 1, 32, 32) in [-1, 1]: Fashion-MNIST padded by 2 pixels of background (-1) on each
side (:func:`to_diffusion`). The classifier sees the central 28x28 crop, rescaled to [0, 1] and normalised as
every zoo model is.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.zoo.data import FMNIST_MEAN, FMNIST_STD


def to_diffusion(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 32, 32) in [-1, 1], padded with -1 (black)."""
    x = images.float().div(127.5).sub(1).unsqueeze(1)
    return nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)


def to_classifier(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, 32, 32) in [-1, 1] -> the classifier's input (N, 1, 28, 28) (module docstring)."""
    if x.dim() != 4 or x.shape[1:] != (1, 32, 32):
        raise SlimError(f"Fashion-MNIST diffusion images are (N, 1, 32, 32); got {tuple(x.shape)}")
    crop = x[:, :, 2:30, 2:30].float().clamp(-1, 1).add(1).div(2)
    return (crop - FMNIST_MEAN) / FMNIST_STD


@torch.no_grad()
def classifier_outputs(classifier: nn.Module, x: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features (N, 128), logits (N, 10)) of the zoo's fmnist-cnn for diffusion images x."""
    feats, logits = [], []
    dev = next(classifier.parameters()).device
    for i in range(0, x.shape[0], batch):
        h = to_classifier(x[i:i + batch]).to(dev)
        h = classifier.layer3(classifier.layer2(classifier.layer1(classifier.stem(h))))
        f = classifier.pool(h).flatten(1)
        feats.append(f.float().cpu())
        logits.append(classifier.fc(f).float().cpu())
    return torch.cat(feats), torch.cat(logits)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of samples whose argmax is the class they were generated for."""
    return float((logits.argmax(1) == labels.to(logits.device)).float().mean())
