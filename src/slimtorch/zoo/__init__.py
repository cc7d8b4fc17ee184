"""Models and weights we ship or load from packages, and the offline data they are measured on."""

from slimtorch.zoo.registry import DEFAULT_MODEL, ZOO, ZooEntry, get_entry, load_model, manifest

__all__ = ["DEFAULT_MODEL", "ZOO", "ZooEntry", "get_entry", "load_model", "manifest"]
