"""Dependencies point one way: no import cycle inside lsr/, and nothing in lsr.export reaches Lightning or lsr.learn.

Imports are read from the source (module level and inside functions alike), so a lazy import counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lsr

ROOT = Path(lsr.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The lsr module an imported name refers to (``lsr.a.b`` for a module, ``lsr.a`` for ``from lsr.a import b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Every module `module` imports: lsr modules resolved, others by their top-level package."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] if base.startswith("lsr") else [base]
        for name in names:
            if name.startswith("lsr"):
                target = _resolve(name)
                if target and target != module:
                    out.add(target)
            elif name:
                out.add(name.split(".")[0])
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w not in MODULES:
                continue
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

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_is_read():
    assert "lsr.pipeline.runner" in GRAPH["lsr.pipeline.apply"]
    assert "lightning" in GRAPH["lsr.learn.block"]
    assert "lsr.learn.fit" in GRAPH["lsr.commands"]  # a function-level import is seen


def test_no_import_cycles_in_lsr():
    assert _cycles() == []


def _reachable(start: str) -> dict[str, str]:
    """Everything `start` reaches, each with the module that imports it (for the error message)."""
    seen, todo = {start: ""}, [start]
    while todo:
        v = todo.pop()
        for w in GRAPH.get(v, ()):
            if w not in seen:
                seen[w] = v
                if w in MODULES:
                    todo.append(w)
    return seen


def test_export_never_reaches_lightning_or_the_trainer():
    for module in [m for m in MODULES if m.startswith("lsr.export")] + ["lsr.pipeline", "lsr.checkpoint"]:
        reached = _reachable(module)
        for bad in ("lightning", "pytorch_lightning", "lsr.learn", "lsr.learn.fit", "lsr.learn.block", "lsr.cli"):
            assert bad not in reached, f"{module} reaches {bad} through {reached.get(bad)}"


def test_importing_the_export_loads_no_lightning():
    code = ("import sys, lsr.export, lsr.pipeline; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning') "
            "or m.startswith('lsr.learn')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
