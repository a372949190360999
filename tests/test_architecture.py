"""The package's shape: no import cycle, layers that import only downwards, files of a readable size.

Read statically with ``ast`` (nothing is imported), so the checks see imports inside functions as
well as at the top of a module: a lazy import still ties two modules together. That ``import lorafx``
stays light is checked at run time by ``tests/test_import.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lorafx"
MAX_LINES = 400

# lorafx.kernels is the bottom layer: it may use the canonical semantics and the error types only.
KERNEL_ALLOWED = ("lorafx.kernels", "lorafx.canonical", "lorafx.errors")
# lorafx.cli is application code on top of the library; only ``python -m lorafx`` starts it.
CLI_ENTRY_POINTS = ("lorafx.__main__",)


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute name ``from ... import`` reads from (relative levels resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]  # a plain module's relative imports start from its package
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str) -> str | None:
    """``name`` if it is a lorafx module, else its longest prefix that is one (None outside lorafx)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """Every lorafx module that ``module`` imports, wherever in the file the import statement is.

    ``from lorafx.pkg import x`` names the module ``lorafx.pkg.x`` when that is a module, else
    ``lorafx.pkg`` itself (x is one of its attributes).
    """
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(), str(MODULES[module]))):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            for alias in node.names:
                full = f"{source}.{alias.name}"
                found.add(full if full in MODULES else _known(source))
    found.discard(None)
    found.discard(module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == 1:
                return path[path.index(nxt) :] + [nxt]
            if colour[nxt] == 0 and (cycle := visit(nxt)):
                return cycle
        path.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if colour[node] == 0 and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_lazy_and_relative_imports():
    """The checks below are only as good as the graph: spot-check that it resolves each import form."""
    assert "lorafx.errors" in GRAPH["lorafx.config"]  # from lorafx.errors import SpecError
    assert "lorafx.cli.sources" in GRAPH["lorafx.cli.inspect_cmd"]  # from lorafx.cli import sources
    assert "lorafx.cli.demo" in GRAPH["lorafx.cli.demo_cmd"]  # from lorafx.cli import demo, inside run()
    assert "lorafx.variants.lora" in GRAPH["lorafx.variants"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _layering_violations() -> list[str]:
    bad = []
    for module, deps in sorted(GRAPH.items()):
        for dep in sorted(deps):
            in_kernels = module == "lorafx.kernels" or module.startswith("lorafx.kernels.")
            if in_kernels and not any(dep == a or dep.startswith(a + ".") for a in KERNEL_ALLOWED):
                bad.append(f"{module} imports {dep} (kernels may import only {', '.join(KERNEL_ALLOWED)})")
            in_cli = module == "lorafx.cli" or module.startswith("lorafx.cli.")
            if not in_cli and module not in CLI_ENTRY_POINTS and (dep == "lorafx.cli" or dep.startswith("lorafx.cli.")):
                bad.append(f"{module} imports {dep} (the command line is application code: nothing below uses it)")
    return bad


def test_layers_import_downwards():
    bad = _layering_violations()
    assert not bad, "\n".join(bad)


def test_no_module_over_the_size_limit():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in MODULES.values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines (split them by responsibility): {long}"
