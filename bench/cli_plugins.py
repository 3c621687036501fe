"""The plugin authors' commands of `learnbench`: `check-plugin` (the conformance kit, optionally with `--set`
hyper-parameters) and `new-algorithm` (a one-file trainer template). `learnbench.cli` parses and dispatches."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import UsageError


def cmd_check_plugin(args: argparse.Namespace) -> int:
    """One line per check; 0 when every check passes, 1 when one fails, 2 when the target cannot be loaded."""
    from .registry import discover, load_plugin_file, resolve_hparams
    from .testing import check_trainer

    if args.target.endswith(".py") or Path(args.target).is_file():
        entries = load_plugin_file(args.target)  # UsageError: missing, fails to import, defines no trainer
    else:
        entries = [discover().get(args.target)]  # UsageError: unknown, or failed to load (with its error)
    from .cli import resolve_device

    device = resolve_device(args.device)
    given = _hparam_sets(args.sets)
    for entry in entries if given else []:  # an unknown key or a bad type: exit 2 before any check runs
        resolve_hparams(entry.cls, dict(given), "check-plugin --set")
    failed = 0
    for entry in entries:
        where = (f"class {entry.cls.__qualname__} in {entry.source} (sha256 {entry.sha256[:12]})" if entry.sha256
                 else f"{entry.cls.__module__}:{entry.cls.__qualname__} ({entry.distribution} {entry.version})")
        print(f"{entry.name}: {where}, on {device}")
        results = check_trainer(entry, device, hparams=given)
        for result in results:
            print(result.line(), flush=True)
        bad = sum(not r.passed for r in results)
        print(f"{entry.name}: {len(results) - bad} of {len(results)} checks passed"
              + (f", {bad} failed" if bad else "") + f" ({sum(r.seconds for r in results):.1f} s)")
        failed += bad
    return 1 if failed else 0


def _hparam_sets(sets: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs (values as TOML, as `run --set` reads them) as a dict; UsageError for a bad one."""
    from .config import parse_value

    given = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects KEY=VALUE; got {item!r}")
        given[key.strip()] = parse_value(value.strip())
    return given


def cmd_new_algorithm(args: argparse.Namespace) -> int:
    from .registry import discover
    from .template import file_name, render

    out = Path(args.out or file_name(args.name))
    text = render(args.name, str(out))  # UsageError for a bad name
    taken = discover().entries.get(args.name)
    if taken is not None:
        raise UsageError(f"the algorithm name {args.name!r} is already taken by {taken.distribution}; pick another")
    if out.exists() and not args.force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    if out.suffix != ".py":
        raise UsageError(f"--out must name a .py file; got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}: algorithm {args.name!r}, plain minibatch SGD to start from; put your update rule in step")
    print(f"next: learnbench check-plugin {out}")
    return 0
