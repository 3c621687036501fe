"""Suite files and the command line's edits to them: finding and parsing a suite (built-in or a TOML file), making
its own files absolute, and `--algorithms/--datasets/--seeds/--set` (the format and the `--set` keys are documented
in `learnbench.config`, which validates and resolves what these return)."""

from __future__ import annotations

import copy
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UsageError, did_you_mean
from .registry import Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENTRY_KEYS = {"id", "label", "models", "datasets", "budget", "unranked", "data_parallel"}
"""Keys of an [[algorithms]] entry that are not hyper-parameters."""
SET_HEADS = ("budget", "model", "eval", "robustness", "diagnostics", "resources", "seeds", "datasets")


# --- loading -----------------------------------------------------------------------------------------------------

def builtin_suites() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("learnbench.suites").iterdir() if p.name.endswith(".toml"))


def load_suite(name_or_path: str) -> tuple[dict[str, Any], str]:
    """A built-in suite name or a TOML file path -> (raw dict, source description)."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise UsageError(f"suite file {name_or_path} does not exist")
        text, source = path.read_text(encoding="utf-8", errors="replace"), str(path)
    elif name_or_path in builtin_suites():
        text = resources.files("learnbench.suites").joinpath(f"{name_or_path}.toml").read_text(encoding="utf-8")
        source = f"built-in suite {name_or_path!r}"
    else:
        raise UsageError(f"unknown suite {name_or_path!r}{did_you_mean(name_or_path, builtin_suites())}; "
                         f"built-in suites: {', '.join(builtin_suites())} "
                         "(or give a path to a .toml file)")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: malformed TOML: {exc}") from None
    raw.setdefault("name", path.stem if path.suffix == ".toml" else name_or_path)
    if path.is_file():
        resolve_paths(raw, path.resolve().parent)
    return raw, source


def resolve_paths(raw: dict[str, Any], folder: Path) -> None:
    """Make a suite's own files absolute, in place, relative to its `folder`: `.npz` datasets and dataset
    factories (`module:function` with `module.py` there; in `datasets`, the entries' `datasets` filters and the
    `robustness.eps_*` tables by dataset) and model factories found there
    (`file.py:function`, or `module:function` when `module.py` sits in the folder), as `--plugin` files are."""
    from .datasets import factory, is_file

    def fix(name: Any) -> Any:
        if isinstance(name, str) and is_file(name) and not Path(name).is_absolute():
            return str(folder / name)
        return factory.resolve(name, folder) if isinstance(name, str) and factory.is_factory(name) else name

    def fix_list(value: Any) -> Any:
        return [fix(v) for v in value] if isinstance(value, list) else fix(value)

    if "datasets" in raw:
        raw["datasets"] = fix_list(raw["datasets"])
    for entry in raw.get("algorithms", []) if isinstance(raw.get("algorithms"), list) else []:
        if isinstance(entry, dict) and "datasets" in entry:
            entry["datasets"] = fix_list(entry["datasets"])
    robustness = raw.get("robustness")
    for key in ("eps_linf", "eps_l2"):
        if isinstance(robustness, dict) and isinstance(robustness.get(key), dict):
            robustness[key] = {fix(k): v for k, v in robustness[key].items()}
    specs = raw.get("models") if isinstance(raw.get("models"), list) else [raw.get("model")]
    for spec in specs:
        if isinstance(spec, dict) and spec.get("kind") == "factory" and isinstance(spec.get("factory"), str):
            module, _, function = spec["factory"].rpartition(":")
            if not module:
                continue  # normalize_spec names the missing module
            file = Path(module) if module.endswith(".py") else Path(*module.split(".")).with_suffix(".py")
            if not file.is_absolute() and (folder / file).is_file():
                spec["factory"] = f"{folder / file}:{function}"


# --- command-line overrides --------------------------------------------------------------------------------------

def parse_value(text: str) -> Any:
    """A `--set` value as TOML (numbers, booleans, lists, quoted strings); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], algorithms: list[str] | None = None, datasets: list[str] | None = None,
                    seeds: int | None = None, sets: list[str] = (), registry: Registry | None = None) -> dict[str, Any]:
    """Return a copy of the raw suite with the CLI's --algorithms/--datasets/--seeds/--set applied. An
    `--algorithms` name the suite lacks but `registry` knows (a plugin, say) joins with its default settings."""
    suite = copy.deepcopy(raw)
    if datasets:
        suite["datasets"] = datasets
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds <= 0:
            raise UsageError(f"--seeds must be a positive integer; got {seeds!r}")
        suite["seeds"] = seeds
    if algorithms:
        _select_algorithms(suite, algorithms, registry)
    if any(item.partition("=")[0].strip().startswith("budget.") for item in sets):
        _clear_budgets(suite)
    model_sets: dict[str, Any] = {}
    for item in sets:
        _apply_set(suite, item, model_sets)
    if model_sets:
        base = (suite.get("models") or [suite.get("model") or {}])[0]
        kind = model_sets.get("kind", base.get("kind"))
        spec = dict(base) if base.get("kind") == kind else {}  # another kind starts from its own defaults
        spec.update(model_sets, kind=kind)
        suite["models"], _ = [spec], suite.pop("model", None)
    return suite


def _select_algorithms(suite: dict[str, Any], algorithms: list[str], registry: Registry | None) -> None:
    """Keep the entries named (by id or label); a name only installed joins as `{"id": name}`."""
    entries = suite.get("algorithms", [])
    known = {e.get("label", e.get("id")) for e in entries} | {e.get("id") for e in entries}
    installed = set(registry.names()) if registry is not None else set()
    missing = [a for a in algorithms if a not in known and a not in installed]
    if missing:
        raise UsageError(f"algorithm(s) {', '.join(missing)}{did_you_mean(missing, (known | installed) - {None})} "
                         f"neither in suite {suite['name']!r} nor installed; "
                         f"the suite has: {', '.join(sorted(k for k in known if k))}")
    suite["algorithms"] = [e for e in entries if e.get("id") in algorithms or e.get("label") in algorithms]
    suite["algorithms"] += [{"id": a} for a in algorithms if a not in known]


def _clear_budgets(suite: dict[str, Any]) -> None:
    """A budget on the command line replaces every budget the suite gives (its [budget], each model's, each
    entry's): the `--set budget.*` items together are the whole budget of every trial, never merged into the suite's
    (`budget.time_s=900` on a suite of `epochs = 15` would otherwise stop at 15 epochs, whichever came first)."""
    suite["budget"] = {}
    for table in (*suite.get("algorithms", []), *suite.get("models", []), suite.get("model", {})):
        if isinstance(table, dict):
            table.pop("budget", None)


def _apply_set(suite: dict[str, Any], item: str, model_sets: dict[str, Any]) -> None:
    """One `--set key=value` into `suite`; `model.*` values are collected in `model_sets` (applied together)."""
    if "=" not in item:
        raise UsageError(f"--set takes key=value; got {item!r}")
    key, _, text = item.partition("=")
    head, _, rest = key.strip().partition(".")
    value = parse_value(text.strip())
    if not rest and head in ("seeds", "datasets"):
        suite[head] = value
    elif head == "model" and rest:
        model_sets[rest] = value
    elif head in ("budget", "eval", "robustness", "diagnostics", "resources") and rest:
        suite.setdefault(head, {})[rest] = value  # budget: emptied first by `_clear_budgets`
    else:
        matched = [e for e in suite.get("algorithms", []) if head in (e.get("id"), e.get("label"))]
        if not matched or not rest:
            heads = [*SET_HEADS, *(e.get(k) for e in suite.get("algorithms", []) for k in ("id", "label"))]
            hint = did_you_mean(key.strip(), [f"{h}.{rest}" if rest else h for h in heads if isinstance(h, str)])
            raise UsageError(f"unknown --set key {key.strip()!r}{hint}: use budget.*, model.*, eval.*, robustness.*, "
                             "diagnostics.*, resources.*, seeds, datasets or <algorithm>.<hyper-parameter>")
        for entry in matched:
            if rest in ENTRY_KEYS:
                raise UsageError(f"--set cannot change {rest!r} of an algorithm entry")
            entry[rest] = value
