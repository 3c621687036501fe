"""The code a trial runs, named by content: part of the trial id, so an edited helper never reuses old results.

`code_digests(cls)` hashes (SHA-256, first 16 hex digits) the source file of every class in the trainer's class
chain that is learnbench's or the trainer's own package's, and of every learnbench module those files import,
followed transitively (`from learnbench import population` in `openai_es.py` brings in `population.py`, which
brings in `population_engines.py` and, through it, `models.py`). Imports are read from the source (`ast`), including imports inside functions; a name
imported from a package (`from learnbench import StepStats`) counts as the module that defines it. Third-party
code (torch, DEAP, pycma) is named by its version in the trial's provenance instead, and a plugin by its file's
SHA-256 or its distribution's version (`registry.Entry.provenance`).

Not hashed: the harness that runs every trial alike (runner, store, CLI): editing it does not change what a
trainer computes, and re-running every trial after each harness edit would make resuming useless.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType

OWN_PACKAGE = "learnbench"


def code_digests(cls: type) -> dict[str, str]:
    """{module name: SHA-256 prefix of its file} for the code `cls` runs (see the module docstring), sorted."""
    roots = {OWN_PACKAGE, cls.__module__.split(".")[0]}
    pending = [k.__module__ for k in cls.__mro__ if k.__module__.split(".")[0] in roots]
    files: dict[str, str] = {}
    while pending:
        name = pending.pop()
        if name in files:
            continue
        path = _source_path(_module(name))
        if path is None:  # a module without a source file (built from a string): nothing to hash
            continue
        files[name] = path
        pending += [m for m in _imported_modules(name, path) if m not in files]
    return {name: _digest(path, _stamp(path)) for name, path in sorted(files.items())}


def _module(name: str) -> ModuleType:
    return sys.modules.get(name) or importlib.import_module(name)


def _source_path(module: ModuleType) -> str | None:
    path = getattr(module, "__file__", None)
    return path if path and path.endswith(".py") and Path(path).is_file() else None


def _stamp(path: str) -> tuple[int, int]:
    stat = Path(path).stat()
    return stat.st_mtime_ns, stat.st_size


@lru_cache(maxsize=None)
def _digest(path: str, stamp: tuple[int, int]) -> str:  # `stamp` invalidates the cache when the file changes
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _imported_modules(name: str, path: str) -> list[str]:
    """The learnbench modules that module `name` (source at `path`) imports anywhere in its code."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = []
    for node in _import_nodes(path, _stamp(path)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == OWN_PACKAGE]
            continue
        base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
            else node.module or ""
        if base.split(".")[0] == OWN_PACKAGE:
            found += [_defining_module(base, alias.name) for alias in node.names]
    return [m for m in found if m.split(".")[0] == OWN_PACKAGE]


@lru_cache(maxsize=None)
def _import_nodes(path: str, stamp: tuple[int, int]) -> tuple[ast.AST, ...]:
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    return tuple(n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))


def _defining_module(base: str, name: str) -> str:
    """`from base import name`: the submodule `base.name` if there is one, else the module that defines the object
    (a class re-exported by a package counts as its own module), else `base`."""
    candidate = f"{base}.{name}"
    if candidate in sys.modules:
        return candidate
    try:
        if importlib.util.find_spec(candidate) is not None:
            return candidate
    except (ImportError, ValueError):  # `base` is a module, not a package
        pass
    defined_in = getattr(getattr(_module(base), name, None), "__module__", None)
    return defined_in if isinstance(defined_in, str) else base
