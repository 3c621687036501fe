"""The `learnbench` command. Exit codes: 0 success; 1 some trials failed or diverged; 2 bad usage or input
(one line on stderr, no traceback, nothing written)."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import pkgutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import UsageError

if TYPE_CHECKING:  # annotations only: each command imports what it needs when it runs
    from .store import Store
    from .trackers import Trackers
    from .trial import StoredTrial, Trial, TrialResult

EPILOG = "Docs: README.md. Exit codes: 0 ok, 1 some trials failed or diverged, 2 bad usage or input."


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="learnbench", description="Compare neural-network training algorithms.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run_command(sub)
    _add_tune_command(sub)

    show = sub.add_parser("show", help="the summary table of a run")
    show.add_argument("run_dir")
    show.add_argument("--json", action="store_true", help="machine-readable results")
    show.add_argument("--curves", action="store_true", help="with --json: also every trial's curves")

    export = sub.add_parser("export", help="write runs' trials, metrics and curves as tidy Parquet or CSV tables")
    export.add_argument("run_dirs", nargs="+")
    export.add_argument("--format", default="parquet", choices=["parquet", "csv"],
                        help="parquet (default; needs pyarrow) or csv")
    export.add_argument("--out", help="output folder (default: RUN_DIR/export; required for several runs)")

    report = sub.add_parser("report", help="write report.md, report.html and figures/ for one or more runs")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("--out", help="output folder (default: the first run directory)")
    report.add_argument("--readme", metavar="README.md", help="also regenerate the README's results section")

    lister = sub.add_parser("list", help="what is installed")
    lister.add_argument("what", nargs="?", default="algorithms", choices=["algorithms", "datasets", "models", "suites"])
    lister.add_argument("--plugin", action="append", default=[], metavar="FILE.py")

    perf = sub.add_parser("perf", help="benchmarks against reference loops and peers")
    perf.add_argument("benchmark", help="one of: " + ", ".join(perf_modules()))
    perf.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's options (--device, ...)")

    check = sub.add_parser("check-plugin", help="the conformance kit: does a trainer keep the contract?")
    check.add_argument("target", metavar="NAME|FILE.py", help="an installed algorithm id or a plugin file")
    check.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    check.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="a hyper-parameter for the kit's runs instead of its default (repeatable), e.g. "
                            "--set optimizer=kfac")

    diagnose = sub.add_parser("diagnose", help="influence locality of a run's trained mlp/resmlp models")
    diagnose.add_argument("run_dir")
    diagnose.add_argument("--trial", help="only this trial (id or unique prefix); default: every done mlp/resmlp")
    diagnose.add_argument("--examples", type=int, default=1000, help="test points attributed (default 1000)")
    diagnose.add_argument("--top", type=int, default=10, help="upstream units kept per unit (default 10)")
    diagnose.add_argument("--data-dir", help="first folder searched for dataset files")

    new = sub.add_parser("new-algorithm", help="write a one-file trainer template that passes check-plugin")
    new.add_argument("name", help="the algorithm id, e.g. my-rule")
    new.add_argument("--out", metavar="FILE.py", help="where to write it (default: ./<name with _ for ->.py)")
    new.add_argument("--force", action="store_true", help="overwrite an existing file")
    return parser


def _add_run_command(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a suite (default: quick)")
    run.add_argument("suite", nargs="?", default="quick", help="built-in suite name or a .toml file")
    _add_suite_options(run, "runs/<suite>[-<hash of the overrides>]")
    run.add_argument("--log", action="append", default=[], metavar="TRACKER[=WHERE]",
                     help="also log each finished trial to tensorboard[=DIR] or mlflow[=URI] (repeatable; needs "
                     "learnbench[track]; default places under the run directory); none drops the suite's [log]")


def _add_tune_command(sub: argparse._SubParsersAction) -> None:
    tune = sub.add_parser("tune", help="equal-budget hyper-parameter tuning of every algorithm of a suite",
                          description="For every problem and algorithm of the suite: STUDIES studies of TRIALS "
                          "configurations drawn from the trainer's search_space, scored on validation; then each "
                          "study's best configuration and the suite's own run on the suite's seeds.")
    tune.add_argument("suite", help="built-in suite name or a .toml file")
    _add_suite_options(tune, "runs/<suite>-tune[-<hash of the overrides>]")
    tune.add_argument("--trials", type=int, default=5, help="configurations per study (default 5)")
    tune.add_argument("--studies", type=int, default=5, help="independent studies per algorithm (default 5)")
    tune.add_argument("--sampler", default="qmc", choices=["qmc", "random", "tpe"],
                      help="Optuna sampler: qmc = scrambled Sobol (default), random, tpe")
    tune.add_argument("--objective", default="val-accuracy", choices=["val-accuracy", "time-to-target"],
                      help="final validation accuracy (default), or the cost to reach --target on validation")
    tune.add_argument("--target", type=float, help="with time-to-target: the validation accuracy to reach (0-1]")
    tune.add_argument("--currency", choices=["flops", "seconds", "examples"],
                      help="with time-to-target: the cost counted (nominal FLOPs, training seconds, examples)")


def _add_suite_options(run: argparse.ArgumentParser, out_default: str) -> None:
    """The options `run` and `tune` share: which suite trials, where they run, where results go."""
    run.add_argument("--algorithms", nargs="+", help="only these algorithm ids or labels (comma or space separated)")
    run.add_argument("--datasets", nargs="+", help="replace the suite's datasets")
    run.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="override a suite value: budget.epochs=5, model.kind=cnn, backprop.lr=0.01, ...")
    run.add_argument("--out", help=f"run directory (default: {out_default})")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run.add_argument("--executor", default="local", choices=["local", "ray"],
                     help="local worker processes, or one Ray task per trial (needs learnbench[ray])")
    run.add_argument("--address", help="with --executor ray: the Ray cluster to join (auto, HOST:PORT, "
                     "ray://HOST:PORT; default: start a local Ray instance with this machine's cores)")
    run.add_argument("--workers", type=int, help="parallel worker processes (default: cores on CPU, 1 on CUDA)")
    run.add_argument("--plugin", action="append", default=[], metavar="FILE.py", help="load a trainer from a file")
    run.add_argument("--data-dir", help="first folder searched for dataset files")
    run.add_argument("--quiet", action="store_true",
                     help="no progress bars (on a terminal) or per-trial lines (stderr not a terminal)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, not at exit: a reader that left (`show RUN | head -1`) raises below
        return code
    except BrokenPipeError:
        if not _reader_left():
            raise  # a worker's pipe, not our stdout
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush goes nowhere
        return 0
    except UsageError as exc:
        print(f"learnbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("learnbench: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _reader_left() -> bool:
    """Whether stdout is a pipe whose reader has gone (`| head -1`): poll reports an error on its write end."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no real stdout: assume it was stdout
        return True


def cmd_run(args: argparse.Namespace) -> int:
    from . import __version__
    from .store import Store
    from .workspace import RunDirLock, prepare_run_dir

    if args.address and args.executor != "ray":
        raise UsageError("--address needs --executor ray")
    if args.executor == "ray":
        from .executor_ray import import_ray

        import_ray()  # a missing extra is one line before any work
    # a Ray cluster's GPUs may be on other nodes than this driver's
    device = args.device if args.executor == "ray" and args.device == "cuda" else resolve_device(args.device)
    suite, trials = _resolve_run(args, device)
    from . import trackers

    tracking = trackers.settings(suite.get("log"), args.log)  # a missing tracker package: exit 2, nothing written
    if args.workers is not None and args.workers <= 0:
        raise UsageError(f"--workers must be a positive integer; got {args.workers}")
    cluster = None
    if args.executor == "ray":
        from .executor_ray import connect

        cluster = connect(args.address, trials)  # before the first write: a bad address is exit code 2
    run_dir = _run_dir(args, suite["name"])
    prepare_run_dir(run_dir)  # the first write: everything above only read
    with RunDirLock(run_dir):
        store = Store(run_dir)
        store.set_run_info({"suite": suite["name"], "suite_config": suite, "learnbench": __version__,
                            "argv": sys.argv[1:], "device": device,
                            "created": store.run_info().get("created", time.time()), "updated": time.time()})
        store.add_trials(trials)
        final = _run_pending(args, store, run_dir, device, trials, cluster,
                             trackers.build(tracking, run_dir, suite["name"]))
        store.close()
    bad = sum(final[t.id] in ("failed", "diverged") for t in trials)
    print(f"learnbench: results in {run_dir}; `learnbench report {run_dir}` writes the report"
          + (f"; {bad} trial(s) failed or diverged" if bad else ""), file=sys.stderr)
    return 1 if bad else 0


def _resolve_run(args: argparse.Namespace, device: str) -> tuple[dict[str, Any], list[Trial]]:
    """The suite with the command line's overrides, its trials, and their datasets present (read only)."""
    from . import __version__, config, datasets
    from .datasets import factory
    from .registry import discover

    registry = discover(args.plugin)
    raw, _ = config.load_suite(args.suite)
    given = [str(Path(d).resolve()) if datasets.is_file(d) else factory.resolve(d, Path.cwd())
             if datasets.is_factory(d) else d for d in _names(args.datasets) or []]
    suite = config.apply_overrides(raw, _names(args.algorithms), given, args.seeds, args.sets, registry)
    trials = config.resolve(suite, registry, device, __version__)
    for name in dict.fromkeys(t.dataset for t in trials):
        datasets.prepare(name, args.data_dir)
    return suite, trials


def _run_dir(args: argparse.Namespace, suite_name: str, kind: str = "", extra: list[Any] | None = None) -> Path:
    """--out, or runs/<suite><kind>, suffixed with a hash of the options that change the trials (so two different
    experiments never share a store); `extra`: a command's own such options, only those not at their defaults."""
    if args.out:
        return Path(args.out)
    overridden = any([args.algorithms, args.datasets, args.seeds, _experiment_sets(args), args.plugin,
                      args.device != "auto", extra])
    return Path("runs") / (suite_name + kind + (f"-{_short_hash(args, extra)}" if overridden else ""))


def _run_pending(args: argparse.Namespace, store: Store, run_dir: Path, device: str, trials: list[Trial],
                 cluster: str | None, trackers: Trackers | None = None) -> dict[str, str]:
    """Run the trials not finished yet on the chosen executor, then the post-run attacks; print the summary
    table and return every trial's final status."""
    from .executor import default_workers
    from .machine import default_threads, usable_cpus
    from .store import FINISHED

    statuses = store.statuses()
    pending = [t for t in trials if statuses.get(t.id) not in FINISHED]  # suite order; the transfer attack runs
    # after all of them (`_post_run`), so no trial has to come first
    workers = args.workers or default_workers(len(pending), device)
    threads = default_threads(workers) if device == "cpu" else usable_cpus()
    where = cluster if args.executor == "ray" else f"{workers} worker(s) x {threads} thread(s)"
    print(f"learnbench: {len(trials)} trials ({len(trials) - len(pending)} already finished) -> {run_dir} "
          f"[{device}, {where}]", file=sys.stderr)
    from .config import budget_lines

    for line in budget_lines(trials):  # what each trial gets once `--set budget.*` and the suite are combined
        print(f"learnbench: budget {line}", file=sys.stderr)
    execute_with_progress(args, store, run_dir, len(trials), pending, workers, threads,
                          trackers.log_trial if trackers else None)
    _post_run(store, run_dir, device, trials, args.data_dir)
    final = store.statuses()
    from .reports import show_table

    ids = {t.id for t in trials}
    print(show_table([t for t in store.trials() if t.id in ids]))
    return final


def execute_with_progress(args: argparse.Namespace, store: Store, run_dir: Path, total: int, pending: list[Trial],
                          workers: int, threads: int,
                          on_finish: Callable[[Trial, TrialResult], None] | None = None) -> None:
    """Run `pending` (of `total` trials) on the command's executor, local worker processes or Ray, with progress
    bars on a terminal, else one line per finished trial, unless --quiet."""
    from .executor import ProgressView, run_local

    # a terminal gets bars; a log file (nohup, a cluster job) one line per finished trial
    view = ProgressView(total, total - len(pending), enabled=not args.quiet and sys.stderr.isatty(),
                        lines=not args.quiet, on_finish=on_finish)
    try:
        if args.executor == "ray":
            from .executor_ray import run_ray

            run_ray(pending, store, str(run_dir), args.data_dir, threads, view)
        else:
            run_local(pending, store, str(run_dir), args.data_dir, workers, threads, view)
    finally:
        view.close()


def _post_run(store: Store, run_dir: Path, device: str, trials: list[Trial], data_dir: str | None) -> None:
    if any(t.robustness.get("examples") for t in trials):
        from .attacks.robustness import post_run

        post_run(store, run_dir, device, data_dir)


def cmd_tune(args: argparse.Namespace) -> int:
    try:
        from .tune import cmd_tune as tune  # Optuna is imported only by this command
    except ImportError as exc:
        if exc.name != "optuna":
            raise
        raise UsageError("learnbench tune needs Optuna, which is not installed: pip install 'optuna>=3.5'") from None
    return tune(args)


def cmd_show(args: argparse.Namespace) -> int:
    from .reports import show_table
    from .store import Store

    if args.curves and not args.json:
        raise UsageError("--curves needs --json")
    store = Store.open(args.run_dir)
    trials = store.trials()
    if args.json:
        curves = store.curves() if args.curves else None
        print(json.dumps({"run": {"dir": str(args.run_dir), **store.run_info()},
                          "trials": [_trial_json(t, curves) for t in trials]}, indent=1, default=str))
    else:
        print(show_table(trials))
    store.close()
    return 0


def _trial_json(trial: StoredTrial, curves: dict[str, list] | None = None) -> dict[str, Any]:
    """A trial in `show --json`: its summary keys, full config and provenance, and with `curves` (the store's,
    by trial id) its curves by metric."""
    from .export import curves_json, trial_config

    out = {"id": trial.id, "algorithm": trial.algorithm, "label": trial.label, "dataset": trial.dataset,
           "model": trial.model_label, "seed": trial.seed, "status": trial.status, "hparams": dict(trial.hparams),
           "tuning": dict(trial.tuning) if trial.tuning else None, "error": trial.error,
           "metrics": dict(trial.metrics), "config": trial_config(trial), "provenance": dict(trial.provenance)}
    if curves is not None:
        out["curves"] = curves_json(curves.get(trial.id, ()))
    return out


def cmd_export(args: argparse.Namespace) -> int:
    """Tidy tables for your own analysis (learnbench.export); prints the files written."""
    from .export import export

    for path in export(args.run_dirs, args.format, args.out):
        print(path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .reports import build_report, readme_section, update_readme

    written = build_report(args.run_dirs, args.out)
    for path in written.values():
        print(path)
    if args.readme:
        update_readme(args.readme, readme_section(args.run_dirs))
        print(args.readme)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    if args.what == "algorithms":
        from .registry import discover

        registry = discover(args.plugin)
        rows = [(e.name, e.distribution, e.version, _first_line(e.cls.__doc__)) for e in registry.entries.values()]
        rows += [(e.name, e.distribution, e.version, f"BROKEN: {e.error}") for e in registry.broken]
        print(tabulate(sorted(rows), headers=["algorithm", "distribution", "version", "description"]))
    elif args.what == "datasets":
        print(tabulate(_dataset_rows(), headers=["dataset", "distribution", "version", "input", "classes", "train",
                                                 "val", "test", "files", "description"]))
    elif args.what == "models":
        from .models import DEFAULTS

        rows = [(kind, ", ".join(f"{k}={v}" for k, v in defaults.items())) for kind, defaults in DEFAULTS.items()]
        rows.append(("factory", 'factory = "package.module:function" or "file.py:function" (+ keyword arguments)'))
        print(tabulate(rows, headers=["model", "keys (defaults)"]))
    else:
        from .config import builtin_suites, load_suite

        rows = [(name, load_suite(name)[0].get("description", "")) for name in builtin_suites()]
        print(tabulate(rows, headers=["suite", "description"]))
    return 0


def _dataset_rows() -> list[tuple]:
    """Built-ins, then the `learnbench.datasets` entry points: a plugin's data are not loaded to list it (that may
    mean a download), only its function imported (BROKEN when that fails); `.npz` files are named by path."""
    from importlib.metadata import EntryPoint

    from . import __version__
    from .datasets import NAMES, info
    from .datasets.plugins import GROUP, plugins

    rows: list[tuple] = [(i.name, "learnbench", __version__, "x".join(map(str, i.input_shape)), i.n_classes, i.n_train,
                          i.n_val, i.n_test, "yes" if i.needs_files else "no", i.description) for i in map(info, NAMES)]
    for plugin in sorted(plugins().values(), key=lambda p: p.name):
        try:
            EntryPoint(plugin.name, plugin.target, GROUP).load()
            text = f"plugin {plugin.target}"
        except Exception as exc:  # noqa: BLE001 - a broken plugin is listed, never fatal
            text = f"BROKEN: {type(exc).__name__}: {exc}"
        rows.append((plugin.name, plugin.distribution, plugin.version, "-", "-", "-", "-", "-", "-", text))
    rows.append(("PATH.npz", "-", "-", "-", "-", "-", "-", "-", "yes", "your own arrays (README: your own data)"))
    return rows


def cmd_perf(args: argparse.Namespace) -> int:
    """Each benchmark module brings its own options: its parser is built only when it is asked for."""
    if args.benchmark not in perf_modules():
        raise UsageError(f"unknown benchmark {args.benchmark!r}; known: {', '.join(perf_modules())}")
    module = importlib.import_module(f"learnbench.perf.{args.benchmark}")
    parser = _Parser(prog=f"learnbench perf {args.benchmark}", description=module.__doc__)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    module.add_arguments(parser)
    options = parser.parse_args(args.options)
    options.device = resolve_device(options.device)
    return module.main(options)


def perf_modules() -> list[str]:
    from . import perf

    return sorted(m.name for m in pkgutil.iter_modules(perf.__path__) if not m.name.startswith("_"))


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return name


def _names(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _short_hash(args: argparse.Namespace, extra: list[Any] | None = None) -> str:
    key = json.dumps([args.algorithms, args.datasets, args.seeds, _experiment_sets(args), args.plugin, args.device]
                     + ([extra] if extra else []))
    return hashlib.sha256(key.encode()).hexdigest()[:6]


def _experiment_sets(args: argparse.Namespace) -> list[str]:
    """The --set items that change trials: resources.* (cpus, gpus, actors) only place them, like --executor and
    --workers."""
    return [s for s in args.sets if not s.strip().startswith("resources.")]


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text and text.strip() else ""


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Influence locality (learnbench.diagnostics.influence): metrics into the store, one summary line per trial."""
    from .diagnostics.influence import diagnose_run

    rows = diagnose_run(args.run_dir, args.trial, args.examples, args.top, args.data_dir)
    for row in rows:
        means = [v for k, v in row["metrics"].items() if k.startswith("influence/mean-distance/")]
        print(f"{row['trial'][:12]} {row['label']} {row['model']} seed {row['seed']}: mean influence distance "
              f"per layer " + " ".join(f"{v:.2f}" for v in means))
    print(f"learnbench: influence metrics added to {args.run_dir}; `learnbench report {args.run_dir}` draws them",
          file=sys.stderr)
    return 0


from .cli_plugins import cmd_check_plugin, cmd_new_algorithm  # noqa: E402 - the plugin authors' commands

COMMANDS = {"run": cmd_run, "tune": cmd_tune, "show": cmd_show, "report": cmd_report, "list": cmd_list,
            "perf": cmd_perf, "check-plugin": cmd_check_plugin, "new-algorithm": cmd_new_algorithm,
            "diagnose": cmd_diagnose, "export": cmd_export}

if __name__ == "__main__":
    sys.exit(main())
