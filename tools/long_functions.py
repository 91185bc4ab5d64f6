"""Print the longest functions and the longest parameter lists in harc_hpc/.

Usage: python tools/long_functions.py [N]   (default N=10)

Length is counted in source lines from the ``def`` line to the function's last
line (docstring included); parameters are every named argument (positional,
keyword-only, ``*args`` and ``**kwargs``), ``self``/``cls`` excluded.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "harc_hpc"


def functions(root: Path = ROOT):
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        stack = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{child.name}"
                    a = child.args
                    params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                    params += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
                    params = [p for p in params if p not in ("self", "cls")]
                    lines = child.end_lineno - child.lineno + 1
                    yield str(path.relative_to(root.parent)), name, lines, len(params)
                    stack.append((child, f"{name}."))
                elif isinstance(child, ast.ClassDef):
                    stack.append((child, f"{prefix}{child.name}."))
                else:
                    stack.append((child, prefix))


def main(argv: list[str]) -> int:
    n = int(argv[1]) if len(argv) > 1 else 10
    rows = list(functions())
    print(f"## {n} longest functions (lines)")
    for path, name, lines, _ in sorted(rows, key=lambda r: -r[2])[:n]:
        print(f"{lines:5d}  {path}:{name}")
    print(f"\n## {n} longest parameter lists")
    for path, name, _, params in sorted(rows, key=lambda r: -r[3])[:n]:
        print(f"{params:5d}  {path}:{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
