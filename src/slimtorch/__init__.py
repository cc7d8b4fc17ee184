"""slimtorch: compress trained PyTorch models and measure what you got.

``slimtorch.apply_(model, config, calib)`` is the one entry point of every compression family
(``slimtorch.api``). It is looked up on first use, so that ``import slimtorch`` (which the command
line does before it can hold Ctrl-C) stays free of torch.
"""

from slimtorch.errors import SlimError

__all__ = ["SlimError", "__version__", "apply_"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "apply_":
        from slimtorch.api import apply_

        return apply_
    raise AttributeError(f"module 'slimtorch' has no attribute {name!r}")
