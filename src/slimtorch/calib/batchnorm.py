"""Re-estimating BatchNorm statistics for a changed network (a simulated PIM forward, a narrowed candidate
of a pruning search): the weights stay; the running means and variances follow the new activations."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def calibrate_bn(model: nn.Module, batches, progress=None) -> int:
    """Re-estimate every BatchNorm's running statistics with ``model``'s own forward (e.g. on the PIM
    simulation): statistics reset, then a cumulative average over ``batches`` (tuples of forward
    arguments). Returns the number of BatchNorm layers calibrated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    was = model.training
    model.eval()
    saved = []
    for bn in bns:
        saved.append(bn.momentum)
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for args in batches if progress is None else progress(batches, "BN calibration"):
            model(*args)
    finally:
        for bn, mom in zip(bns, saved):
            bn.momentum = mom
        model.train(was)
    return len(bns)
