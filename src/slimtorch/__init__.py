"""slimtorch: compress trained PyTorch models and measure what you got."""

from slimtorch.errors import SlimError

__all__ = ["SlimError", "__version__"]
__version__ = "0.1.0"
