"""The layering the README's Architecture section states, checked on the source (AST, no imports run).

- no import cycle anywhere in `hysac_hf/` + `modeling/` (function-level imports included);
- `hysac_hf/data/` stands on `data/`, the errors module and `modeling/` only;
- search and the index folder format live in `modeling/gallery_hysac.py` alone: elsewhere in the product no `.topk(`
  ranking, no FAISS file read, written or searched, and no file name of the folder format.
"""

from __future__ import annotations

import ast
from pathlib import Path

from hysac_hf.testing import REPO_ROOT

PACKAGE = REPO_ROOT / "hysac_hf"
MODELING = REPO_ROOT / "modeling"
ENGINE = MODELING / "gallery_hysac.py"
# The product: what users install or run (benchmarks and tests may do anything to measure or check it).
PRODUCT = [*PACKAGE.rglob("*.py"), *MODELING.glob("*.py"), *(REPO_ROOT / "space").glob("*.py"), REPO_ROOT / "train.py"]
# (embeddings.safetensors is also the embedding cache's own file name, so it proves nothing here)
FORMAT_FILE_NAMES = {"index.json", "metadata.jsonl", "faiss.index"}


def module_name(path: Path) -> str:
    if path.parent == MODELING:
        return "hysac_hf.modeling" + ("" if path.stem == "__init__" else f".{path.stem}")
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_files() -> dict[str, Path]:
    files = [p for p in PACKAGE.rglob("*.py") if not p.is_symlink()] + list(MODELING.glob("*.py"))
    return {module_name(p): p for p in files}


def imported_modules(path: Path, known: dict[str, Path]) -> set[str]:
    """The library modules `path` imports anywhere in its body (resolved to the longest known module name)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [f"{target}.{alias.name}" for alias in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known and "." in candidate:
                candidate = candidate.rsplit(".", 1)[0]
            if candidate in known and candidate != name:
                found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    known = library_files()
    return {name: imported_modules(path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_library():
    graph = import_graph()
    assert "hysac_hf.modeling.gallery_hysac" in graph and graph["hysac_hf.data"]  # the graph is really built
    assert cycles(graph) == []


def test_the_data_layer_stands_on_errors_and_modeling_only():
    graph = import_graph()
    for name, imports in graph.items():
        if name == "hysac_hf.data" or name.startswith("hysac_hf.data."):
            outside = {
                m
                for m in imports
                if not (m.startswith("hysac_hf.data") or m == "hysac_hf.errors" or m.startswith("hysac_hf.modeling"))
            }
            assert outside == set(), f"{name} imports {sorted(outside)}"


def test_modeling_imports_nothing_of_the_library_around_it():
    graph = import_graph()
    for name, imports in graph.items():
        if name.startswith("hysac_hf.modeling"):
            assert all(m.startswith("hysac_hf.modeling") for m in imports), f"{name} imports {sorted(imports)}"


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def search_and_format_uses(path: Path) -> list[str]:
    """`.topk(` calls, FAISS reads/writes/searches and format file names (outside docstrings) in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = _docstring_nodes(tree)
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "topk":
                uses.append(f"line {node.lineno}: .topk(")
            if node.func.attr in ("read_index", "write_index") or (
                node.func.attr == "search" and isinstance(node.func.value, ast.Name) and node.func.value.id == "faiss"
            ):
                uses.append(f"line {node.lineno}: faiss {node.func.attr}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in FORMAT_FILE_NAMES:
                uses.append(f"line {node.lineno}: {node.value!r}")
    return uses


def test_search_and_the_index_format_live_in_the_engine_alone():
    assert search_and_format_uses(ENGINE)  # the checker sees the engine's own uses
    elsewhere = {
        str(path.relative_to(REPO_ROOT)): search_and_format_uses(path)
        for path in PRODUCT
        if path != ENGINE and not path.is_symlink()
    }
    assert {path: uses for path, uses in elsewhere.items() if uses} == {}
