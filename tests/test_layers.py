"""The import layers of docs/architecture.md, enforced on the source (``ast``, every import
statement, lazy ones inside functions included) and on what an import really loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Package -> the packages it may import. A package may always import itself; none may
#: import a package missing from its row. The order reads like the data flow: the wire, the
#: events, the L1 firmware and the shared models, the nodes, then the offline analysis and
#: the deployment that wires everything together.
ALLOWED: dict[str, set[str]] = {
    "stream": set(),
    "simulator": {"stream"},
    "firmware": {"stream"},
    "models": {"stream"},
    "nodes": {"stream", "simulator", "firmware", "models"},
    "analysis": {"stream", "models"},
    "deploy": {"stream", "simulator", "firmware", "models", "nodes", "analysis"},
}


def _modules() -> Iterator[tuple[str, Path]]:
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


def _imports(path: Path) -> Iterator[str]:
    """Every absolute module name ``path`` imports (``from a.b import c`` gives a.b and
    a.b.c, since c may be a module)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the layers use absolute ones)"
            assert node.module is not None
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _crossings() -> dict[tuple[str, str], list[str]]:
    """(file, other package) -> the imports of that package from that file."""
    found: dict[tuple[str, str], list[str]] = {}
    for package, path in _modules():
        for name in _imports(path):
            top = name.split(".")[0]
            if top in ALLOWED and top != package:
                found.setdefault((str(path.relative_to(ROOT)), top), []).append(name)
    return found


def test_imports_follow_the_layers() -> None:
    bad = [
        f"{file} imports {', '.join(sorted(set(names)))}"
        for (file, other), names in sorted(_crossings().items())
        if other not in ALLOWED[file.split("/")[0]]
    ]
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_production_code_imports_no_test_fakes() -> None:
    """``stream.testing`` holds fakes for tests and demos: only the synthetic roles of
    ``deploy.synthetic`` (the shipped demo farm) may import it."""
    users = sorted(
        str(path.relative_to(ROOT))
        for _, path in _modules()
        if any(name.startswith("stream.testing") for name in _imports(path))
    )
    assert users == ["deploy/synthetic.py"], users


def test_the_table_is_a_layering() -> None:
    """No two packages may import each other, even through others."""

    def reach(package: str) -> set[str]:
        seen: set[str] = set()
        todo = [package]
        while todo:
            for other in ALLOWED[todo.pop()] - seen:
                seen.add(other)
                todo.append(other)
        return seen

    assert all(package not in reach(package) for package in ALLOWED)


def _module_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, leaving out package ``__init__`` modules
    (a package re-exports its modules' names; a module importing from its own package's
    ``__init__`` is no cycle of concepts)."""
    names = {}
    for _, path in _modules():
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] != "__init__":
            names[".".join(parts)] = path
    return {
        name: {m for m in _imports(path) if m in names and m != name}
        for name, path in names.items()
    }


def test_no_module_imports_itself_back() -> None:
    graph = _module_graph()
    cycles = []
    for start in graph:
        todo, seen = list(graph[start]), set()
        while todo:
            module = todo.pop()
            if module == start:
                cycles.append(start)
                break
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
    assert not cycles, f"modules in an import cycle: {sorted(cycles)}"
    # The cycle this replaced: the topology took its roles from deploy.roles, which
    # builds on the topology. The registry is passed in now.
    assert "deploy.roles" not in graph["deploy.topology"]


@pytest.mark.slow
def test_the_archive_node_and_the_analysis_load_no_event_generator() -> None:
    code = (
        "import sys, nodes.archive, analysis\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'pythia8mc', 'fastjet'})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == [], f"import nodes.archive, analysis loaded {loaded}"
