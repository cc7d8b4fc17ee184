"""YAML for small configuration files, bounded before it is built: size, nesting, node count, no aliases,
no duplicate keys, strict UTF-8.

PyYAML's safe loader runs no code, but a short file can still expand without bound ("billion laughs":
aliases of aliases), recurse past Python's stack (thousands of nested ``[``), silently keep the last of
two equal keys, or hold a 5,000-digit integer that Python refuses to convert. A recipe needs none of this,
so each is one error here, raised while the document is composed, before any value is built.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from slimtorch.errors import SlimError, shown
from slimtorch.io.files import regular_file

MAX_BYTES = 64 * 1024
MAX_DEPTH = 16
MAX_NODES = 10_000


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream, where: str):
        super().__init__(stream)
        self.where, self.depth, self.nodes = where, 0, 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise SlimError(f"{self.where} uses a YAML alias (*name); write the value out instead")
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise SlimError(f"{self.where} has more than {MAX_NODES} YAML nodes")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise SlimError(f"{self.where} nests deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
            except TypeError:  # an unhashable key (a list or mapping as a key)
                raise SlimError(f"{self.where}: a mapping key must be a plain value, got {shown(key)}") from None
            if dup:
                raise SlimError(f"{self.where}: key {shown(key)} appears twice in one mapping")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml_file(path: Path, what: str = "file") -> object:
    """The YAML document in ``path`` (a regular UTF-8 file of at most 64 KiB), or SlimError."""
    path = Path(path)
    where = f"{what} {path}"
    regular_file(what, path, MAX_BYTES)
    try:
        data = path.read_bytes()[:MAX_BYTES + 1]
    except OSError as exc:
        raise SlimError(f"cannot read {where}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SlimError(f"{where} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    loader = None
    try:
        loader = _BoundedLoader(text, where)  # its reader refuses control characters here already
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise SlimError(f"{where} is not valid YAML: {shown(exc, 200)}") from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. an integer of over 4300 digits
        raise SlimError(f"{where} holds a value YAML cannot convert: {shown(exc, 120)}") from None
    finally:
        if loader is not None:
            loader.dispose()
