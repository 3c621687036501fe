"""Finding trainers: entry points in the group `learnbench.algorithms` (built-ins register the same way) and single
files passed with `--plugin FILE.py`; reading and validating their hyper-parameters.

A trainer's hyper-parameters are its dataclass fields (the built-ins' form) or, for a plain class, the keyword
parameters of its `__init__`, stored under the same names (scikit-learn's rule).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import entry_points, packages_distributions, version as dist_version
from pathlib import Path
from typing import Any, Iterator

from . import checks
from .errors import UsageError, did_you_mean

GROUP = "learnbench.algorithms"
DISABLE_ENV = "LEARNBENCH_DISABLE_PLUGIN_AUTOLOAD"
PLUGIN_PREFIX = "_learnbench_plugin_"  # private module names of --plugin files
_EXTRA: dict[str, "Entry"] = {}  # registered in this process only (the conformance kit's classes); see `registered`


@dataclass
class Entry:
    """One registered trainer, or one that failed to load (`error` set, `cls` None)."""

    name: str
    cls: type | None
    distribution: str
    version: str
    source: str  # "entry-point" or the plugin file's path
    sha256: str | None = None  # plugin files only
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        info = {"distribution": self.distribution, "version": self.version}
        if self.sha256:  # a --plugin file: the runner reloads it from `file` in worker processes
            info.update(file=self.source, sha256=self.sha256)
        elif self.source != "entry-point":  # a class registered in-process only (`registered`)
            info.update(source=self.source)
        return info


class Registry:
    """Name -> Entry. Build it with `discover(plugin_files)`."""

    def __init__(self, entries: dict[str, Entry], broken: list[Entry]):
        self.entries = entries
        self.broken = broken

    def get(self, name: str) -> Entry:
        if name in self.entries:
            return self.entries[name]
        for entry in self.broken:
            if entry.name == name:
                raise UsageError(f"algorithm {name!r} failed to load ({entry.distribution}): {entry.error}")
        raise UsageError(f"unknown algorithm {name!r}{did_you_mean(name, self.entries)}; "
                         f"installed: {', '.join(sorted(self.entries))}")

    def names(self) -> list[str]:
        return sorted(self.entries)


def discover(plugin_files: list[str] | tuple[str, ...] = ()) -> Registry:
    """Load every entry point of the group (only learnbench's own when LEARNBENCH_DISABLE_PLUGIN_AUTOLOAD=1) and
    every plugin file. A plugin that fails to import is kept in `broken`; two claiming one name is an error."""
    entries: dict[str, Entry] = {}
    broken: list[Entry] = []
    autoload = os.environ.get(DISABLE_ENV, "") in ("", "0")
    for ep in entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist else "unknown"
        if not autoload and dist != "learnbench":
            continue
        version = ep.dist.version if ep.dist else "unknown"
        try:
            cls = ep.load()
            if not is_trainer_class(cls):
                raise TypeError(f"{ep.value} is not a trainer class (needs a str `name` and setup, step, eval_model)")
        except Exception as exc:  # a broken plugin is reported, never fatal
            broken.append(Entry(ep.name, None, dist, version, "entry-point", error=f"{type(exc).__name__}: {exc}",
                                extra={"target": ep.value}))
            continue
        _add(entries, Entry(cls.name, cls, dist, version, "entry-point", extra={"target": ep.value}))
    for path in plugin_files:
        for entry in load_plugin_file(path):
            _add(entries, entry)
    for entry in _EXTRA.values():
        _add(entries, entry)
    return Registry(entries, broken)


@contextmanager
def registered(entry: Entry) -> Iterator[Entry]:
    """Make `entry` part of every `discover()` in this process while the block runs: the conformance kit runs a
    class that is neither installed nor in a file (one defined in a test) through the real runner this way."""
    if entry.name in _EXTRA and _EXTRA[entry.name].cls is not entry.cls:
        raise UsageError(f"two classes claim the algorithm name {entry.name!r}: {_EXTRA[entry.name].source} "
                         f"and {entry.source}")
    previous = _EXTRA.get(entry.name)
    _EXTRA[entry.name] = entry
    try:
        yield entry
    finally:
        if previous is None:
            del _EXTRA[entry.name]
        else:
            _EXTRA[entry.name] = previous


def entry_for_class(cls: type) -> Entry:
    """The registry entry of a trainer class: its installed entry point if it has one, else one built from the
    distribution that ships its module (or, for a class defined outside any distribution, its module's name)."""
    if not is_trainer_class(cls):
        raise UsageError(f"{cls!r} is not a trainer class (needs a str `name` and setup, step, eval_model)")
    for ep in entry_points(group=GROUP):
        if ep.value.replace(":", ".") == f"{cls.__module__}.{cls.__qualname__}" and ep.dist is not None:
            return Entry(cls.name, cls, ep.dist.name, ep.dist.version, "entry-point")
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None)
    if cls.__module__.startswith(PLUGIN_PREFIX) and file:
        for entry in load_plugin_file(file):
            if entry.cls is cls:
                return entry
    dists = packages_distributions().get(cls.__module__.split(".")[0], [])
    source = f"{cls.__module__}:{cls.__qualname__}"
    if dists:
        return Entry(cls.name, cls, dists[0], dist_version(dists[0]), source)
    return Entry(cls.name, cls, cls.__module__, "unregistered", source)


def import_file(file: Path, prefix: str):
    """Import FILE.py as the module `<prefix><sha256 of its bytes, 12 hex>`: the same content is imported once, an
    edited file afresh. An exception while it executes propagates and leaves no half-imported module behind."""
    module_name = f"{prefix}{hashlib.sha256(file.read_bytes()).hexdigest()[:12]}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return module


def import_target(target: str, prefix: str) -> Any:
    """The object a `module:attribute` or `file.py:attribute` string names: a module imported as usual, a `.py` file
    through `import_file` (one private module per file content, so an edited file is loaded afresh). Whatever the
    import raises propagates (callers turn it into their one-line UsageError)."""
    module_name, _, attribute = target.rpartition(":")
    if module_name.endswith(".py"):
        if not Path(module_name).is_file():
            raise ImportError(f"no file {module_name}")
        module = import_file(Path(module_name), prefix)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, attribute)


def target_source(target: str) -> str | None:
    """The `.py` file behind a `module:attribute` or `file.py:attribute` string (for hashing into trial ids), or
    None when there is none (a compiled or missing module)."""
    module_name = target.rpartition(":")[0]
    if module_name.endswith(".py"):
        return module_name if Path(module_name).is_file() else None
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    origin = getattr(found, "origin", None)
    return origin if origin and origin.endswith(".py") and Path(origin).is_file() else None


def load_plugin_file(path: str | os.PathLike) -> list[Entry]:
    """Import FILE.py under a private module name; register every class that implements the Trainer protocol."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"plugin file {path} does not exist")
    digest = hashlib.sha256(file.read_bytes()).hexdigest()  # the entry's provenance
    try:
        module = import_file(file, PLUGIN_PREFIX)
    except Exception as exc:
        raise UsageError(f"plugin file {path} failed to import: {type(exc).__name__}: {exc}") from None
    module_name = module.__name__
    found = [obj for obj in vars(module).values() if is_trainer_class(obj) and obj.__module__ == module_name]
    if not found:
        raise UsageError(f"plugin file {path} defines no trainer (a class with `name`, setup, step, eval_model)")
    return [Entry(cls.name, cls, file.stem, "file", str(file.resolve()), sha256=digest) for cls in found]


def is_trainer_class(obj: Any) -> bool:
    return (inspect.isclass(obj) and isinstance(getattr(obj, "name", None), str)
            and all(callable(getattr(obj, m, None)) for m in ("setup", "step", "eval_model")))


def _add(entries: dict[str, Entry], entry: Entry) -> None:
    old = entries.get(entry.name)
    if old is not None and old.cls is not entry.cls:
        raise UsageError(f"two plugins claim the algorithm name {entry.name!r}: {old.distribution} "
                         f"({_where(old)}) and {entry.distribution} ({_where(entry)})")
    entries[entry.name] = entry


def _where(entry: Entry) -> str:
    target = entry.extra.get("target")
    return f"entry point {target}" if target else entry.source


# --- hyper-parameters -------------------------------------------------------------------------------------------

def hparam_defaults(cls: type) -> dict[str, Any]:
    """Every hyper-parameter of a trainer class with its default (required ones map to `inspect.Parameter.empty`)."""
    if dataclasses.is_dataclass(cls):
        out = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = inspect.Parameter.empty
        return out
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def hparams_of(trainer: Any) -> dict[str, Any]:
    """The hyper-parameters a trainer instance holds (scikit-learn's get_params)."""
    return {name: getattr(trainer, name) for name in hparam_defaults(type(trainer))}


def resolve_hparams(cls: type, given: dict[str, Any], where: str) -> dict[str, Any]:
    """Defaults updated with `given`; unknown names, missing required values and wrong types are UsageErrors.
    Values are normalised to JSON-friendly forms (tuples become lists) so the trial hash is stable."""
    defaults = hparam_defaults(cls)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UsageError(f"{where}: unknown hyper-parameter(s) {', '.join(unknown)} for {cls.name!r}"
                         f"{did_you_mean(unknown, defaults)}; "
                         f"known: {', '.join(defaults)}")
    hints = _type_hints(cls)
    out = {}
    for name, default in defaults.items():
        value = given.get(name, default)
        if value is inspect.Parameter.empty:
            raise UsageError(f"{where}: {cls.name!r} needs a value for hyper-parameter {name!r}")
        if name in given and name in hints:
            value = checks.of_type(value, hints[name], f"{where}: {cls.name}.{name}")
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:
        return {}
