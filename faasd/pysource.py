"""What a Python module's text tells without running it: its syntax error, or
its top-level names (faasd/spec.py checks a handler with these before any
worker starts).

A big module, or one that Python workers of another version than the
daemon's will run, is parsed in a child process that runs this file as a
script (`python -I pysource.py NAME`: the text on stdin, its facts as JSON on
stdout), so this module imports nothing of faasd's: a script has no package
to import from. Nor anything newer than the oldest Python a worker may run.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass

# A module bigger than this is parsed in a child process: the parser holds the
# GIL from start to end (about 2 s for 1.5 MB here), so parsed in one of the
# daemon's threads it would stop the event loop, and every request, as long.
PARSE_IN_CHILD_BYTES = 64 * 1024
PARSE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ModuleFacts:
    """What a Python module's text tells without running it."""

    syntax_error: str | None = None  # "invalid syntax (main.py, line 3)"
    syntax_at: tuple[int | None, str | None] | None = None  # the SyntaxError's line: number, text
    names: frozenset[str] | None = None  # top-level names; None where only an import can tell


def parse(source: bytes, filename: str, python: str | None = None) -> ModuleFacts:
    """The facts of a module's text, in the grammar of `python` (a child process of
    that interpreter), else of this one (a child process for a big module)."""
    if python is not None or len(source) > PARSE_IN_CHILD_BYTES:
        return _facts_from_child(source, filename, python or sys.executable)
    return _facts(source, filename)


def _facts(source: bytes, filename: str) -> ModuleFacts:
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        where = f"{filename}, line {exc.lineno}" if exc.lineno else filename
        return ModuleFacts(syntax_error=f"{exc.msg} ({where})", syntax_at=(exc.lineno, exc.text))
    except ValueError as exc:  # source code string cannot contain null bytes
        return ModuleFacts(syntax_error=f"{exc} ({filename})")
    except (RecursionError, MemoryError):
        return ModuleFacts(syntax_error=f"too deeply nested to parse ({filename})")
    return ModuleFacts(names=_top_level_names(tree))


def _facts_from_child(source: bytes, filename: str, python: str) -> ModuleFacts:
    """`_facts` in a child process (this file run as a script); no facts if it fails."""
    try:
        done = subprocess.run([python, "-I", __file__, filename], input=source,
                              capture_output=True, timeout=PARSE_TIMEOUT_S, check=True)
        answer = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return ModuleFacts()
    names, syntax_at = answer["names"], answer["syntax_at"]
    return ModuleFacts(syntax_error=answer["syntax_error"],
                       syntax_at=None if syntax_at is None else tuple(syntax_at),
                       names=None if names is None else frozenset(names))


def _top_level_names(tree: ast.Module) -> frozenset[str] | None:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        else:
            # Anything dynamic (if/try/for at module level) may define the
            # handler; only a worker's import can tell.
            return None
    return frozenset(names)


if __name__ == "__main__":
    # The child of _facts_from_child: a module's text on stdin, its facts on stdout.
    found = _facts(sys.stdin.buffer.read(), sys.argv[1])
    json.dump({"syntax_error": found.syntax_error, "syntax_at": found.syntax_at,
               "names": None if found.names is None else sorted(found.names)}, sys.stdout)
