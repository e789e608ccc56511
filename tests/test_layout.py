"""The package layout holds: no import cycle in ragkit/ or evals/ (lazy imports count), ragkit never imports
evals, and the public names of ``ragkit`` and ``ragkit.quant`` are exactly the pinned ones.

The import graph is built from the source with ``ast``, so an import inside a function is an edge too.
Importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` (unless the importer is inside ``a.b``, whose
``__init__`` already ran); ``from pkg import name`` where ``pkg`` exports ``name`` lazily (an ``_EXPORTS``
table read by ``__getattr__``) is an edge to the module that defines ``name``. Blocks under
``if TYPE_CHECKING:`` never run and are not edges.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ragkit", "evals")

# Changing the public API? Change it here too, in the same commit, and say so in the docs.
RAGKIT_ALL = [
    "AdapterError", "FinetuneError", "StructuredOutputError", "read_adapters",
    "BadServerResponseError", "ContextWindowExceededError", "EmbedderMismatchError", "EmptyIndexError",
    "FaissVectorStore", "IndexCorruptError", "IndexDirectory", "IndexLockedError", "IndexNotFoundError",
    "IngestError", "InvalidArgumentError", "InvalidQueryError", "LocalLLM", "MemoryPlan", "MemoryPlanError", "ModelLoadError",
    "ModelNotFoundError", "OpenAICompatibleLLM", "Pipeline", "QuantizationError", "RagkitError", "ServerError",
    "ServerRequestError", "ServerUnavailableError", "plan",
]
QUANT_ALL = [
    "ExpertLayout", "Footprint", "NF4Experts", "Placement", "dequantize_fp8", "expert_layout_for",
    "has_fused_experts", "load_nf4", "measure_footprint", "needs_ragkit_nf4", "nf4_placement", "quantize_fp8",
    "register_expert_layout", "write_fp8_checkpoint",
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import statement that can run (anywhere, including inside functions), not TYPE_CHECKING blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _lazy_exports(path: Path) -> dict[str, str]:
    """The ``_EXPORTS`` table (public name -> module) of a package ``__init__`` that imports on first use."""
    for node in ast.parse(path.read_text()).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "_EXPORTS" and isinstance(node.value, ast.Dict):
            return {k.value: v.value for k, v in zip(node.value.keys, node.value.values)}
    return {}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    lazy = {name: _lazy_exports(path) for name, path in modules.items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)} | {name}

        def add(target: str) -> None:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the module and the packages whose __init__ it runs
                mod = ".".join(parts[:i])
                if mod in modules and mod not in own:
                    graph[name].add(mod)

        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name)
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            add(base)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    add(f"{base}.{alias.name}")
                elif alias.name in lazy.get(base, {}):
                    add(lazy[base][alias.name])
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_lazy_imports_and_package_inits():
    graph = import_graph()
    assert "ragkit.quant.loader" in graph["ragkit.loading"]  # imported inside load_model
    assert "ragkit.quant" in graph["ragkit.placement"]  # importing ragkit.quant.nf4 runs ragkit/quant/__init__
    assert "ragkit.llm" in graph["ragkit.pipeline"]  # lazy, inside a method
    assert "evals.core.runner" in graph["evals.needle.suite"]


def test_find_cycle_reports_a_cycle_and_its_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    graph = import_graph()
    sub = {m: {t for t in ts if t.split(".")[0] == package} for m, ts in graph.items() if m.split(".")[0] == package}
    cycle = find_cycle(sub)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_ragkit_never_imports_evals():
    bad = {m: sorted(t for t in ts if t.split(".")[0] == "evals")
           for m, ts in import_graph().items() if m.split(".")[0] == "ragkit"}
    assert not {m: ts for m, ts in bad.items() if ts}


def test_evals_core_names_no_suite():
    """The shared machinery reads the suites from evals.core.registry; it imports no suite package."""
    bad = {m: sorted(t for t in ts if not t.startswith(("evals.core", "ragkit")) and t != "evals")
           for m, ts in import_graph().items() if m.startswith("evals.core")}
    assert not {m: ts for m, ts in bad.items() if ts}


def test_ragkit_public_names_are_pinned():
    import ragkit

    assert ragkit.__all__ == sorted(RAGKIT_ALL)
    for name in RAGKIT_ALL:
        assert getattr(ragkit, name) is not None
        assert name in dir(ragkit), f"{name} is exported but missing from dir(ragkit)"


def test_quant_public_names_are_pinned():
    import ragkit.quant

    assert ragkit.quant.__all__ == sorted(QUANT_ALL)
    assert set(QUANT_ALL) <= set(dir(ragkit.quant))


@pytest.mark.parametrize("init", ["ragkit/__init__.py", "ragkit/quant/__init__.py"])
def test_type_checking_block_names_every_export(init):
    """Type checkers and IDEs see every lazily exported name, from the module the table names."""
    path = ROOT / init
    exports = _lazy_exports(path)
    seen: dict[str, str] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom):
                    seen.update({a.asname or a.name: stmt.module for a in stmt.names})
    assert seen == exports


def test_importing_ragkit_imports_no_heavy_module():
    code = "import sys, ragkit, ragkit.quant; print(sorted(m for m in ('torch', 'transformers', 'evals') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
