"""The package's layering, checked on its source: hooks only through slimtorch.hooks, the CLI imported
only by itself (and ``python -m slimtorch``), and no import cycle between modules, counting imports
inside functions too (a lazy import still makes the two modules depend on each other)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "slimtorch"


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every slimtorch module ``path`` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("slimtorch")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slimtorch"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in SRC.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Cycles met by a depth-first walk of ``edges`` (module -> the modules it imports)."""
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycles():
    # a package's __init__ importing its own modules is not a cycle of those modules
    edges = {m: {i for i in deps if not (m.startswith(f"{i}.") and (SRC / Path(*i.split(".")[1:]) / "__init__.py").exists())}
             for m, deps in _graph().items()}
    assert find_cycles(edges) == []


def test_hooks_are_registered_only_in_hooks_py():
    offenders = [str(p.relative_to(ROOT)) for folder in ("src", "tests", "benchmarks")
                 for p in (ROOT / folder).rglob("*.py")
                 if p != SRC / "hooks.py" and p != Path(__file__).resolve()
                 and ("register_forward_hook" in p.read_text() or "register_forward_pre_hook" in p.read_text())]
    assert offenders == []


def test_only_the_cli_imports_the_cli():
    offenders = [str(p.relative_to(ROOT)) for folder in ("src", "benchmarks") for p in (ROOT / folder).rglob("*.py")
                 if "slimtorch.cli" in str(_imports(p)) and not p.is_relative_to(SRC / "cli")
                 and p != SRC / "__main__.py"]
    assert offenders == []


def test_the_cycle_search_finds_a_planted_lazy_cycle(tmp_path):
    """As int4_gemm <-> int4_mma was before issue 18: one import at the top, the other inside a function."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from slimtorch.b import x\n")
    b.write_text("def f():\n    from slimtorch import a\n")
    edges = {"slimtorch.a": _imports(a) & {"slimtorch.b"}, "slimtorch.b": _imports(b) & {"slimtorch.a"}}
    assert find_cycles(edges) == [["slimtorch.a", "slimtorch.b", "slimtorch.a"]]
