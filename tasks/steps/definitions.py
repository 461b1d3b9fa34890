"""Fingerprints of a module's top-level functions and classes, kept from one process to the next.

A step's cache key holds the syntax tree of every function and class its code reaches
(`tasks.steps.cache`), so a comment or a reformat is not a change. Parsing and dumping those
modules took 0.25 s of every new process here (25 files for the demo pipeline), on the one core a
small run is bound to, and again in every run the warm pool's runner forks. A file's table is the
same for the same bytes and the same Python, so it is kept in the user's cache
(`~/.cache/keel/definitions/`, named by a digest of both) and read back by the next process.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import sys
import threading
from pathlib import Path

FORMAT = b"1"  # what a kept table holds: change it when that changes
KEPT_TABLES = 2000  # the newest kept; older ones are removed when a new one is written
# Python 3.11's AST construction is not safe in two threads at once: steps side by side keying
# their code together failed with "SystemError: AST constructor recursion depth mismatch"
# (python/cpython#106905). One parse at a time.
PARSING = threading.Lock()

Definition = ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
Table = dict[str, tuple[int, str]]  # name -> (first line, decorators included; fingerprint)

_tables: dict[str, Table] = {}  # by digest: this process's


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tree_fingerprint(node: ast.AST) -> str:
    """A syntax tree's fingerprint: comments and layout are not in it."""
    return fingerprint(ast.dump(node))


def top_level(file: str) -> Table:
    """For each function and class defined at the top of `file` (the first, if a name is defined
    twice): its first line, decorators included, and the fingerprint of its syntax tree alone."""
    source = Path(file).read_bytes()
    digest = hashlib.sha256(FORMAT + b" " + sys.version.encode() + b"\n" + source).hexdigest()[:32]
    table = _tables.get(digest)
    if table is None:
        table = _kept(digest)
        if table is None:
            table = _parse(source)
            _keep(digest, table)
        _tables[digest] = table
    return table


def _parse(source: bytes) -> Table:
    with PARSING:
        tree = ast.parse(source.decode("utf-8"))
        table: Table = {}
        for node in tree.body:
            if isinstance(node, Definition) and node.name not in table:
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                table[node.name] = (first, tree_fingerprint(ast.Module(body=[node], type_ignores=[])))
    return table


def _folder() -> Path:
    from infra.templates import cache_dir

    return cache_dir() / "definitions"


def _kept(digest: str) -> Table | None:
    """The table an earlier process kept, or None (none, unreadable, or not a table)."""
    with contextlib.suppress(OSError, RuntimeError, ValueError, TypeError):
        kept = json.loads((_folder() / f"{digest}.json").read_text(encoding="utf-8"))
        return {str(name): (int(first), str(value)) for name, (first, value) in kept.items()}
    return None


def _keep(digest: str, table: Table) -> None:
    """Write the table for the next process (whole or not at all); where the cache cannot be
    written, the next process parses again."""
    from infra.secrets import write_private

    with contextlib.suppress(OSError, RuntimeError):
        folder = _folder()
        folder.mkdir(parents=True, exist_ok=True)
        write_private(folder / f"{digest}.json", json.dumps(table).encode())
        _prune(folder)


def _prune(folder: Path) -> None:
    tables = list(folder.glob("*.json"))
    if len(tables) > KEPT_TABLES:
        tables.sort(key=lambda path: path.stat().st_mtime_ns)
        for old in tables[: len(tables) - KEPT_TABLES]:
            old.unlink(missing_ok=True)
