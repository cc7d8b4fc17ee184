"""Finished blocks of a layer-by-layer run, saved as they finish, so that an interrupted calibration resumes
at its last finished block (issue 23: GPTQ on an 8B model takes many minutes; a lost job must not lose them).

Each block is one file of the quantized format (``block-00012.safetensors``: packed codes, scales, the rest of
the block's tensors, checksummed, written atomically), tagged with the run's key: what the run computes (model,
recipe, method, calibration data digest). Files of another run are refused with one line, never mixed in.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.export.quantized import load_quantized, save_quantized
from slimtorch.io.checkpoint import read_metadata


def calib_digest(calib: list) -> str:
    """sha256 of the calibration batches' tensors (dtype, shape, bytes) in order: the same data, the same run."""
    h = hashlib.sha256()
    for batch in calib:
        for t in batch if isinstance(batch, tuple | list) else (batch,):
            if isinstance(t, torch.Tensor):
                c = t.detach().contiguous().cpu()
                h.update(f"{c.dtype}{tuple(c.shape)}".encode())
                h.update(c.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


class BlockCheckpoints:
    """Finished blocks in ``folder`` for the run described by ``key`` (a JSON-able dict)."""

    def __init__(self, folder: Path | str, key: dict) -> None:
        self.folder, self.key = Path(folder), key
        for f in sorted(self.folder.glob("block-*.safetensors")):
            if read_metadata(f).get("run") != key:
                raise SlimError(f"{f} was written by another run (other model, recipe, method or calibration "
                                f"data); remove {self.folder} or resume with the same settings")

    def path(self, index: int) -> Path:
        return self.folder / f"block-{index:05d}.safetensors"

    def has(self, index: int) -> bool:
        return self.path(index).is_file()

    def done(self) -> int:
        """How many blocks are saved."""
        return len(list(self.folder.glob("block-*.safetensors")))

    def save(self, index: int, block: nn.Module) -> None:
        save_quantized(block, self.path(index), base=f"block {index}", extra={"run": self.key})

    def load(self, index: int, block: nn.Module) -> None:
        """Rebuild ``block`` (float, as the run found it) in place from its file (the rebuilt modules on the
        CPU: the caller moves the block where it runs)."""
        _, meta = load_quantized(self.path(index), block)
        if meta.get("run") != self.key:
            raise SlimError(f"{self.path(index)} was written by another run; remove {self.folder}")
