"""The package's layering, read from its source with `ast`: every `import` (inside functions too) is an edge
of the module graph; the graph has no cycle, and the store never reaches up into the runtime, the
simulator or the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import moe_offload

ROOT = Path(moe_offload.__file__).resolve().parent
PKG = "moe_offload"


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = [PKG, *p.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports, wherever in the file the import statement sits. `from X import
    a`: X.a when that is a module, else X (the nearest enclosing known module)."""

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            r = resolve(t) if t.split(".")[0] == PKG else None
            if r is not None and r != name:
                found.add(r)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_the_cycle_finder_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_inside_functions_count(tmp_path):
    (tmp_path / "x.py").write_text("def f():\n    from .y import g\n    from . import z\n")
    known = {"moe_offload.x", "moe_offload.y", "moe_offload.z", "moe_offload"}
    assert imports("moe_offload.x", tmp_path / "x.py", known) == {"moe_offload.y", "moe_offload.z"}


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_store_imports_nothing_above_it():
    above = tuple(f"{PKG}.{m}" for m in ("runtime", "sim", "cli", "__main__", "autoconf", "plan"))
    bad = sorted(f"{m} -> {t}" for m, ts in graph().items() if m.startswith(f"{PKG}.store")
                 for t in ts if t.startswith(above))
    assert not bad, "store/ imports from above it: " + ", ".join(bad)


def test_the_machine_probes_and_the_bench_workload_sit_below_their_readers():
    g = graph()
    above = tuple(f"{PKG}.{m}" for m in ("bench", "concurrency", "sim", "plan", "store", "runtime", "cli",
                                         "__main__", "autoconf"))
    bad = sorted(f"{m} -> {t}" for m in (f"{PKG}.hardware", f"{PKG}.workload") for t in g[m] if t.startswith(above))
    assert not bad, "imports from above: " + ", ".join(bad)
    assert f"{PKG}.bench" not in g[f"{PKG}.concurrency"]
