"""The package's shape (DESIGN.md): imports flow one way (no module or package cycle, lazy imports included), no
module imports another's private names, no module over 450 lines. Read from the sources (ast), not by importing."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "rwkv_torch"
MAX_LINES = 450


def _modules() -> dict:
    """``{dotted name: (path, is_package)}`` for every module of the package."""
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def _imports(mods: dict) -> tuple[dict, list]:
    """Every import edge between our modules (at any depth of the file: lazy imports count) and every import of a
    private name (``_x``) from another module."""
    edges, private = {m: set() for m in mods}, []
    for m, (p, is_pkg) in mods.items():
        pkg = m if is_pkg else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - max(node.level - 1, 0)] if node.level else []
                target = ".".join(base + [node.module]) if node.module else ".".join(base)
                if not target.startswith("rwkv_torch"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    dest = sub if sub in mods else target
                    if dest in mods and dest != m:
                        edges[m].add(dest)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and sub not in mods:
                        private.append(f"{m} imports {target}.{alias.name}")
            elif isinstance(node, ast.Import):
                edges[m].update(a.name for a in node.names if a.name in mods and a.name != m)
    return edges, private


def _cycles(graph: dict) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_cycle():
    mods = _modules()
    edges, _ = _imports(mods)
    # A package's __init__ re-exporting its own children is not an edge back up.
    graph = {m: {t for t in ts if not (mods[t][1] and m.startswith(t + "."))} for m, ts in edges.items()}
    assert _cycles(graph) == []


def test_no_package_cycle():
    """Between the package's parts (``ops``, ``layers``, ``decode``, ``train``, ``slippi``, ... and each top-level
    module): ``train`` and ``slippi`` never import each other, ``ops`` imports nothing above it."""
    mods = _modules()
    edges, _ = _imports(mods)

    def part(m):
        return m.split(".")[1] if "." in m else m

    graph = {}
    for m, ts in edges.items():
        for t in ts:
            if part(m) != part(t) and t != "rwkv_torch":
                graph.setdefault(part(m), set()).add(part(t))
    assert _cycles(graph) == []
    assert not graph.get("ops", set()) - {"ops"}, f"ops imports {graph.get('ops')}"
    assert "slippi" not in graph.get("train", ()) and "train" not in graph.get("slippi", ())


def test_no_private_imports_across_modules():
    _, private = _imports(_modules())
    assert private == []


def test_no_module_over_the_limit():
    big = {str(p.relative_to(ROOT)): n for p, _ in _modules().values()
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}
