"""Building the diffusion models from weights files written by ``scripts/train_diffusion.py`` (safetensors
with the model's config in the metadata), without unpickling anything."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from slimtorch.diffusion.dit import DiT
from slimtorch.diffusion.unet import DDPMUNet
from slimtorch.errors import SlimError
from slimtorch.io.checkpoint import load_tensors

KINDS = {"fmnist-ddpm-unet": DDPMUNet, "fmnist-lowdiff-unet": DDPMUNet, "fmnist-dit": DiT}


def zoo_weights(name: str) -> tuple[Path, str]:
    """The shipped weights file of zoo diffusion model ``name`` and its manifest sha256."""
    from slimtorch.zoo.registry import WEIGHTS_DIR, manifest

    path, row = WEIGHTS_DIR / f"{name}.safetensors", manifest().get(name)
    if row is None or not path.is_file():
        raise SlimError(f"the diffusion model {name!r} is not shipped in this checkout (no weights file or manifest "
                        f"row); give a weights file written by scripts/train_diffusion.py")
    return path, row["sha256"]


def load_diffusion(path: Path | str, sha256: str | None = None) -> nn.Module:
    """The model saved at ``path`` (its file name says which kind: fmnist-ddpm-unet, fmnist-lowdiff-unet or
    fmnist-dit), in float32 and eval mode. A bare zoo name (``fmnist-ddpm-unet``) loads the shipped weights,
    checked against the manifest's sha256."""
    if isinstance(path, str) and path in KINDS or (not Path(path).exists() and str(path) in KINDS):
        path, sha256 = zoo_weights(str(path))
    path = Path(path)
    kind = next((k for k in KINDS if path.name.startswith(k)), None)
    if kind is None:
        raise SlimError(f"{path.name}: not a diffusion model file (names start with {' or '.join(KINDS)})")
    tensors, meta = load_tensors(path, sha256)
    config = meta.get("config")
    if not isinstance(config, dict):
        raise SlimError(f"{path}: no model config in its metadata; was it written by scripts/train_diffusion.py?")
    try:
        model = KINDS[kind](**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    except TypeError as exc:
        raise SlimError(f"{path}: its config does not build a {KINDS[kind].__name__}: {exc}") from None
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if missing or unexpected:
        raise SlimError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
