"""Quantizers that set their range from the first tensor they see, without a device sync per step.

Such a quantizer keeps an ``initialized`` boolean buffer (saved in checkpoints, so a resumed run does
not start its ranges again). Reading a CUDA buffer in Python (``if not self.initialized``) waits for the
GPU; one wait per layer per step made QAT on a shared GPU several times slower. :class:`FirstBatchInit`
checks the buffer only until it reads True and then remembers that on the Python side; loading a state
dict forgets it, so a checkpoint that says "not initialized" is obeyed.
"""

from __future__ import annotations

from torch import nn


class FirstBatchInit(nn.Module):
    """Mixin for a module with an ``initialized`` bool buffer (a scalar, or one flag per slot)."""

    _ready = False

    def needs_init(self, slot: int | None = None) -> bool:
        """Whether ``initialized`` (or its entry ``slot``) is still False. Reads the buffer only until every
        flag is set."""
        if self._ready:
            return False
        flags = self.initialized
        if bool(flags.all()):
            self._ready = True
            return False
        return not bool(flags if slot is None else flags[slot])

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._ready = False
        super()._load_from_state_dict(*args, **kwargs)
