"""The package's modules import each other one way: no circle, counting imports inside functions
(a late import hides a circle from Python, not from whoever reads the code)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "vlsae_guard"


def _module(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` names in any import statement, at any depth."""
    here = _module(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            base = ".".join(p for p in (base, node.module or "") if p)
            # `from pkg import sub` names the submodule; `from pkg import name`, pkg itself
            subs = [f"{base}.{alias.name}" for alias in node.names]
            names = [n for n in subs if n in modules]
            if len(names) < len(subs):
                names.append(base)
        else:
            continue
        found |= {n for n in names if n in modules}
    return found - {here}


def _graph(root: Path) -> dict[str, set[str]]:
    files = {_module(p, root): p for p in root.rglob("*.py")}
    return {name: _imports(path, root, set(files)) for name, path in files.items()}


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph``, as a path that ends where it starts; None if there is none."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for target in sorted(graph[node]):
            if found := visit(target, [*path, node]):
                return found
        done.add(node)
        return None

    return next((c for n in sorted(graph) if (c := visit(n, []))), None)


def test_no_import_circle():
    graph = _graph(PACKAGE)
    assert "vlsae_guard.core.sae" in graph["vlsae_guard.core.checkpoint"]  # the graph is read
    circle = _circle(graph)
    assert circle is None, " -> ".join(circle)


def test_a_late_import_back_is_a_circle(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub/__init__.py").write_text("")
    (root / "sub/model.py").write_text("def save():\n    from .files import write\n")
    (root / "sub/files.py").write_text("from ..sub import model\n")
    (root / "top.py").write_text("from .sub.model import save\n")
    graph = _graph(root)
    assert graph["pkg.top"] == {"pkg.sub.model"}
    assert _circle(graph) == ["pkg.sub.files", "pkg.sub.model", "pkg.sub.files"]
