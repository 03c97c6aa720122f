"""The code base's shape: no import cycles between pamarl's modules, and no module over 450 lines without
a reason at its top (a ``Length:`` paragraph in its docstring)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in (SRC / "pamarl").rglob("*.py"):
        parts = p.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def test_no_import_cycles_at_module_level():
    """Module-level imports between pamarl modules form a DAG (imports inside functions are lazy by design
    and ``if TYPE_CHECKING:`` blocks do not run)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pamarl"):
                graph[m] |= {t for t in [node.module, *(f"{node.module}.{a.name}" for a in node.names)] if t in mods}
            elif isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in mods}
    state: dict[str, int] = {}
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(u: str) -> None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append([*path[path.index(v):], v])
            elif v not in state:
                visit(v)
        path.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_long_modules_say_why():
    long = []
    for name, p in _modules().items():
        text = p.read_text()
        if text.count("\n") > 450:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "Length:" not in doc:
                long.append(f"{name} ({text.count(chr(10))} lines)")
    assert not long, f"modules over 450 lines without a 'Length:' reason in their docstring: {long}"
