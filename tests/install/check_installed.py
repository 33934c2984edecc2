"""Check an installed ptm_kernels from outside the source tree (run by `make check-sdist` / `check-cuda-build`).

    python tests/install/check_installed.py --source DIR [--cuda]

Run it with the interpreter that has the installed package (its own folder goes first on sys.path, so run it
from a folder that holds no ptm_kernels/). It checks that
- ptm_kernels is imported from the installation, not from DIR (the source tree or unpacked sdist it was built
  from), and the installation holds every Python file of DIR's packages;
- the compiled extension ptm_kernels._C imports;
- with --cuda: _C was built with CUDA, and `_C.cuda` exposes every kernel function that the Python layer
  calls for each op family the CUDA sources declare. The calls are found by reading the installed package's
  code (every `backend.kernels(<family>, x).<function>`), the families from csrc/cuda's declarations, so
  neither list is copied by hand; and the dispatcher (`backend.supports`) agrees that CUDA serves them.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path
from typing import Dict, List, Set


def _family(arg: ast.expr, constants: Dict[str, str], where: str) -> str:
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.Name) and arg.id in constants:
        return constants[arg.id]
    raise SystemExit(f"{where}: backend.kernels(...) with an op family that is not a string constant: "
                     f"{ast.unparse(arg)}; teach tests/install/check_installed.py to read it")


def _is_kernels_call(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "kernels"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "backend" and bool(node.args))


def kernel_calls(package: Path) -> Dict[str, Set[str]]:
    """{op family: kernel functions the Python layer requires}, from every `backend.kernels(family, x).f`
    and `mod = backend.kernels(family, x); mod.f` in the package. `getattr(mod, "f", default)` is optional."""
    calls: Dict[str, Set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        constants = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                     and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                     for t in node.targets if isinstance(t, ast.Name)}
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            bound: Dict[str, str] = {}  # local name -> family, for `mod = backend.kernels(...)`
            for node in ast.walk(func):
                if isinstance(node, ast.Assign) and _is_kernels_call(node.value):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            bound[target.id] = _family(node.value.args[0], constants, f"{path}:{node.lineno}")
            for node in ast.walk(func):
                if not isinstance(node, ast.Attribute):
                    continue
                if _is_kernels_call(node.value):
                    family = _family(node.value.args[0], constants, f"{path}:{node.lineno}")
                elif isinstance(node.value, ast.Name) and node.value.id in bound:
                    family = bound[node.value.id]
                else:
                    continue
                calls.setdefault(family, set()).add(node.attr)
            for node in ast.walk(func):  # getattr(mod, "name") without a default is a requirement too
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                        and len(node.args) == 2 and isinstance(node.args[0], ast.Name)
                        and node.args[0].id in bound and isinstance(node.args[1], ast.Constant)):
                    calls.setdefault(bound[node.args[0].id], set()).add(node.args[1].value)
    return calls


def cuda_declared(source: Path) -> Set[str]:
    """Function names declared by csrc/cuda/kernels.h and the files it includes from csrc/."""
    names: Set[str] = set()
    seen: Set[Path] = set()
    todo = [source / "csrc" / "cuda" / "kernels.h"]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        text = re.sub(r"//.*", "", path.read_text())
        names |= set(re.findall(r"\b([a-z_][a-z0-9_]*)\s*\(", text))
        for inc in re.findall(r'#include\s+"([^"]+)"', text):
            todo += [path.parent / inc, source / "csrc" / inc]
    if not seen:
        raise SystemExit(f"{source}/csrc/cuda/kernels.h not found: --source must be the tree the wheel was built from")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="the tree the installed wheel was built from")
    parser.add_argument("--cuda", action="store_true", help="also require the CUDA kernels")
    args = parser.parse_args()
    source = args.source.resolve()

    import ptm_kernels

    installed = Path(ptm_kernels.__file__).resolve().parent
    for tree in (source, Path(__file__).resolve().parents[2]):  # the built tree and this repository
        assert installed != tree / "ptm_kernels", f"ptm_kernels was imported from the source tree ({installed})"
    import ptm_kernels.models

    for package, folder in ((ptm_kernels, source / "ptm_kernels"), (ptm_kernels.models, source / "models")):
        root = Path(package.__file__).parent
        missing = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.py")
                         if "__pycache__" not in p.parts and not (root / p.relative_to(folder)).is_file())
        assert not missing, f"the installation {root} lacks {package.__name__} files: {missing}"

    from ptm_kernels import _C, backend

    print(f"ptm_kernels from {installed}; _C = {Path(_C.__file__).name}, built_with_cuda={_C.built_with_cuda}")
    if not args.cuda:
        return
    assert _C.built_with_cuda and hasattr(_C, "cuda"), "ptm_kernels._C was built without CUDA"
    problems = cuda_problems(kernel_calls(installed), cuda_declared(source), _C.cuda,
                             lambda family: backend.supports("cuda", family, "cuda"))
    if problems:
        sys.exit("ptm_kernels._C.cuda is incomplete:\n  " + "\n  ".join(problems))


def cuda_problems(calls: Dict[str, Set[str]], declared: Set[str], cuda_module, dispatcher_supports) -> List[str]:
    """What is wrong with `cuda_module` for the families whose kernels the CUDA sources declare ([] = none)."""
    families = sorted(f for f, names in calls.items() if names & declared)
    if not families:
        return [f"no op family's kernels are declared in csrc/cuda (the Python layer calls {calls})"]
    problems = []
    for family in families:
        missing = sorted(n for n in calls[family] if not hasattr(cuda_module, n))
        if missing:
            problems.append(f"{family}: _C.cuda lacks {missing}")
        if not dispatcher_supports(family):
            problems.append(f"{family}: backend.supports('cuda', {family!r}, 'cuda') is False")
        print(f"  {family:<20} {'MISSING' if missing else 'ok'}: {', '.join(sorted(calls[family]))}")
    others = sorted(set(calls) - set(families))
    print(f"  (families without CUDA kernels, served by Triton on the GPU: {', '.join(others) or 'none'})")
    return problems


if __name__ == "__main__":
    main()
