"""No import cycles in ptm_kernels.

Two checks. (1) The module-level imports of the package's own modules form no cycle (read from the source: an
import of `a.b.c` also runs the package `a.b`, unless the importer lives in it). (2) Every module imports alone
in a fresh interpreter, and the pairs that once formed cycles import in either order: a cycle that only works in
one import order fails there.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ptm_kernels": ROOT / "ptm_kernels", "ptm_kernels.models": ROOT / "models"}

# Pairs that formed cycles (issue 13), imported in both orders.
PAIRS = [("ptm_kernels.reference_kernels", "ptm_kernels.reference_relative"),
         ("ptm_kernels.attention_mask", "ptm_kernels.ops"),
         ("ptm_kernels.attention_mask", "ptm_kernels.nn"),
         ("ptm_kernels.kernel_params", "ptm_kernels.ops.attention")]


def _modules() -> Dict[str, Path]:
    """Every module of the package (and of ptm_kernels.models, installed from models/) -> its file."""
    out = {}
    for prefix, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix] + parts)] = path
    return out


def _is_package(name: str, modules: Dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _resolve(module: str, level: int, target: Optional[str], modules: Dict[str, Path]) -> str:
    if level == 0:
        return target or ""
    base = module.split(".")
    if not _is_package(module, modules):
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _top_level_imports(module: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The package modules `module` runs when it is imported (module-level statements, not function bodies)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: Set[str] = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node.level, node.module, modules)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
            elif isinstance(node, (ast.If, ast.Try)):  # a guarded import still runs at import time
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))

    visit(tree.body)
    own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    if _is_package(module, modules):
        own_packages.add(module)
    edges: Set[str] = set()
    for name in found:
        parts = name.split(".")
        # importing a.b.c runs a, a.b and a.b.c: the packages the importer is inside of are already running
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in modules and prefix not in own_packages and prefix != module:
                edges.add(prefix)
    return edges


def _find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    state: Dict[str, int] = {}  # 1: on the stack, 2: done
    stack: List[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_module_level_imports_form_no_cycle():
    modules = _modules()
    graph = {m: _top_level_imports(m, p, modules) for m, p in modules.items()}
    assert graph["ptm_kernels.ops.attention"] >= {"ptm_kernels.attention_mask", "ptm_kernels.kernel_params"}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


# Each case imports its modules, in order, in a process where no ptm_kernels module was imported yet. One
# interpreter forks a child per case; before that it loads the third-party modules the package uses (found by a
# first child that imports everything), so that each child only pays for ptm_kernels itself.
_DRIVER = textwrap.dedent("""
    import importlib, json, os, sys, traceback

    def ours(name):
        return name.split(".")[0] in ("ptm_kernels", "models", "tests")

    def in_child(work):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                out, status = work().encode(), 0
            except BaseException:
                out, status = traceback.format_exc().encode(), 1
            os.write(write, out)
            os._exit(status)
        os.close(write)
        message = b""
        while chunk := os.read(read, 65536):
            message += chunk
        os.close(read)
        return os.waitpid(pid, 0)[1], message.decode()

    def import_all(names):
        for name in names:
            importlib.import_module(name)
        return json.dumps(sorted(sys.modules))

    cases = json.loads(sys.argv[1])
    status, loaded = in_child(lambda: import_all(sorted({m for case in cases for m in case})))
    if status:
        sys.exit("importing every module failed: " + loaded)
    for name in json.loads(loaded):
        if not ours(name):
            try:
                importlib.import_module(name)
            except BaseException:
                pass  # a module that cannot be imported on its own: the children import it themselves
    failures = {}
    for case in cases:
        assert not any(ours(m) for m in sys.modules), [m for m in sys.modules if ours(m)]
        status, message = in_child(lambda: import_all(case))
        if status:
            failures[" then ".join(case)] = message[-2000:] or f"exit status {status}"
    print(json.dumps(failures))
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks a fresh child per case")
def test_each_module_imports_alone_and_the_old_cycles_in_both_orders():
    cases = [[m] for m in _modules()] + [list(p) for p in PAIRS] + [list(reversed(p)) for p in PAIRS]
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    run = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(cases)], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    failures = json.loads(run.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(f"{case}:\n{msg}" for case, msg in failures.items())
