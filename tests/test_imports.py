"""The first-party import graph of fastbyol/ and pipelines/, read from the source with `ast`.

Truth: an import circle is a cycle in the graph of "module A imports module B", counting imports at
module level AND inside functions (a function-level import only postpones a circle, it does not
remove it). The graph must be acyclic, `pipelines` must never import `fastbyol`, and an import
inside a function is allowed only where LAZY below says why (never to dodge a circle: those
imports are edges of the graph too).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fastbyol", "pipelines")

# (importing module, imported module) -> why the import sits inside a function.
LAZY = {
    **{("fastbyol.cli", m): "the command line imports a verb's module only when that verb runs: `fastbyol "
                            "export` does not load the training loop, and a verb whose module is missing "
                            "(convert) is left out of --help instead of breaking every other verb"
       for m in ("fastbyol.config", "fastbyol.dist", "fastbyol.train", "fastbyol.profile", "fastbyol.export",
                 "fastbyol.finetune", "fastbyol.knn", "fastbyol.linear", "fastbyol.results",
                 "fastbyol.models.resnet", "pipelines.convert", "pipelines.labelled", "fastbyol.atomic",
                 "fastbyol.checkpoint", "fastbyol.views")},
    ("pipelines.ffcv", "pipelines.ffcv_decode"): "an optional backend: ffcv_decode imports ffcv and numba at module "
                                                 "level, and `import pipelines` must work without them",
    ("pipelines.convert", "pipelines.ffcv_writer"): "an optional backend: ffcv_writer imports ffcv at module level, "
                                                    "and convert names what to install when it is missing",
}


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every .py file of the two packages (a package is its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported first-party module, inside a function?) for every import statement of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, inner) for a in child.names if a.name.split(".")[0] in PACKAGES)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                if base.split(".")[0] in PACKAGES:
                    for a in child.names:  # `from pkg import mod` names a module when mod.py exists
                        found.append((f"{base}.{a.name}" if f"{base}.{a.name}" in known else base, inner))
            visit(child, inner)

    visit(tree, False)
    return found


def graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """Edges (module -> modules it imports) and the function-level imports as (module, imported)."""
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    lazy = []
    for name, path in known.items():
        for target, in_function in imports(name, path, known):
            assert target in known, f"{path}: imports {target}, which is no module of {PACKAGES}"
            if target != name:
                edges[name].add(target)
            if in_function:
                lazy.append((name, target))
    return edges, lazy


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_circle_and_nothing_in_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_reader_sees_module_and_function_level_imports(tmp_path):
    pkg = tmp_path / "fastbyol"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from fastbyol import b\nimport torch\n\ndef f():\n    from fastbyol.c import x\n")
    known = {"fastbyol": pkg / "__init__.py", "fastbyol.a": pkg / "a.py", "fastbyol.b": pkg / "b.py",
             "fastbyol.c": pkg / "c.py"}
    assert imports("fastbyol.a", pkg / "a.py", known) == [("fastbyol.b", False), ("fastbyol.c", True)]


def test_no_import_circle_counting_imports_inside_functions():
    edges, _ = graph()
    assert find_cycle(edges) is None, f"import circle: {' -> '.join(find_cycle(edges))}"


def test_pipelines_never_imports_fastbyol():
    edges, _ = graph()
    wrong = sorted((m, t) for m, targets in edges.items() if m.startswith("pipelines") for t in targets
                   if t.startswith("fastbyol"))
    assert not wrong, wrong


def test_every_import_inside_a_function_has_its_reason():
    _, lazy = graph()
    unexplained = sorted(set(lazy) - set(LAZY))
    assert not unexplained, f"first-party imports inside functions, with no reason in LAZY: {unexplained}"
    stale = sorted(set(LAZY) - set(lazy))
    assert not stale, f"LAZY names imports that are no longer inside a function: {stale}"
