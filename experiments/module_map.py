"""The package's module map at git revisions: each module's lines, its largest function and its
largest class, and the totals (files, lines, files over 400 lines, classes over 150), for the
layout issue's before/after.

    python experiments/module_map.py 6fff617 HEAD
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True)
    return done.stdout


def largest(tree: ast.AST, kind: type) -> tuple[int, str]:
    """(lines, name) of the longest definition of `kind` anywhere in the module, or (0, "")."""
    found = [(n.end_lineno - n.lineno + 1, n.name) for n in ast.walk(tree) if isinstance(n, kind)]
    return max(found, default=(0, ""))


def module_rows(revision: str) -> list[tuple[str, int, tuple[int, str], tuple[int, str]]]:
    paths = [
        p
        for p in git("ls-tree", "-r", "--name-only", revision, "dcff_jax").split()
        if p.endswith(".py")
    ]
    rows = []
    for path in sorted(paths):
        source = git("show", f"{revision}:{path}")
        tree = ast.parse(source)
        function = largest(tree, (ast.FunctionDef, ast.AsyncFunctionDef))
        rows.append((path, len(source.splitlines()), function, largest(tree, ast.ClassDef)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revisions", nargs="+", help="git revisions, e.g. 6fff617 HEAD")
    args = parser.parse_args()
    for revision in args.revisions:
        rows = module_rows(revision)
        print(f"== {revision} ({git('rev-parse', '--short', revision).strip()})")
        print("| module | lines | largest function | largest class |")
        print("|---|---|---|---|")
        for path, lines, (f_lines, f_name), (c_lines, c_name) in rows:
            cls = f"{c_lines} `{c_name}`" if c_lines else "-"
            print(f"| {path} | {lines} | {f_lines} `{f_name}` | {cls} |")
        total = sum(r[1] for r in rows)
        over = [r[0] for r in rows if r[1] > 400]
        big_classes = [f"{r[3][1]} ({r[3][0]})" for r in rows if r[3][0] > 150]
        print(
            f"files {len(rows)}, lines {total}, files over 400 lines {len(over)} "
            f"({', '.join(over) or '-'}), classes over 150 lines {len(big_classes)} "
            f"({', '.join(big_classes) or '-'})"
        )


if __name__ == "__main__":
    main()
