"""One validation for everything a suite file says: each check raises a `UsageError` that names the key, what it
must be and what it got, in one line (the CLI turns it into exit code 2 before anything is written).

Used by `config` (the suite's tables, budgets, resources), `attacks.robustness` (the [robustness] table) and
`models` (model specs). Hyper-parameters are checked against their trainer's type hints by pydantic
(`of_type`): strict JSON semantics, so an int is a float but a bool is not a number, a string is never a number,
and a TOML list fills a tuple."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import Any

from .errors import UsageError, did_you_mean


def known_keys(table: Any, known: Any, where: str) -> dict[str, Any]:
    """`table` as a dict whose keys are all in `known`; UsageError for anything else."""
    if not isinstance(table, dict):
        raise UsageError(f"{where} must be a table; got {table!r}")
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}{did_you_mean(unknown, known)}; "
                         f"known: {', '.join(known)}")
    return table


def integer(value: Any, where: str, minimum: int = 0) -> int:
    """An int (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise UsageError(f"{where} must be {kind}; got {value!r}")
    return value


def number(value: Any, where: str, low: float = 0.0, high: float = math.inf, low_inclusive: bool = False) -> float:
    """A finite int or float (not a bool) in (low, high], or [low, high] with `low_inclusive`."""
    ok = _is_number(value) and math.isfinite(value) and (value >= low if low_inclusive else value > low)
    if not ok or value > high:
        if (low, high) == (0.0, math.inf):
            kind = "a non-negative number" if low_inclusive else "a positive number"
        else:
            kind = f"a number in {'[' if low_inclusive else '('}{low:g}, {high:g}]"
        raise UsageError(f"{where} must be {kind}; got {value!r}")
    return float(value)


def names(value: Any, where: str) -> list[str]:
    """A list of strings; a comma-separated string is split."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where} must be a list of names; got {value!r}")
    return value


def of_type(value: Any, hint: Any, where: str) -> Any:
    """`value` (as TOML or the command line gave it) checked against a type hint and converted to it (an int for a
    float hint becomes a float, a list for a tuple hint a tuple); UsageError naming the expected type."""
    import pydantic

    adapter = _adapter(hint)
    if adapter is None:
        raise UsageError(f"{where} has type {_describe(hint)}, which a suite cannot set")
    try:
        return adapter.validate_json(json.dumps(value), strict=True)
    except (pydantic.ValidationError, TypeError, ValueError):
        raise UsageError(f"{where} must be {_describe(hint)}; got {value!r}") from None


@lru_cache(maxsize=None)
def _adapter(hint: Any):
    import pydantic

    try:
        return pydantic.TypeAdapter(hint)
    except pydantic.PydanticSchemaGenerationError:  # an arbitrary class: no JSON value can be one
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(hint: Any) -> str:
    text = str(hint).replace("typing.", "")
    return text.replace("<class '", "").replace("'>", "")
