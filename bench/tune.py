"""`learnbench tune SUITE`: equal tuning budgets for every algorithm of a suite (AlgoPerf's external tuning ruleset).

Protocol. For every problem (dataset x model) and algorithm entry of the suite: S studies (`--studies`, default 5)
of N configurations each (`--trials`, default 5), drawn by Optuna from the trainer's `search_space`
(`learnbench.search_space`) with `--sampler qmc` (scrambled Sobol, the default), `random` or `tpe`
(`learnbench.studies`); every entry gets the same N, S and per-configuration budget (its problem's). A configuration
is the entry's own values updated with the drawn ones, resolved and validated as `run` resolves an entry
(`config.with_hparams`). It is an ordinary trial (label `LABEL (search)`, `Trial.tuning` = {"role": "search",
"entry", "study", "index", "sampler", "space"}) run by the usual executors into the run's results store and scored
on validation only (`--objective val-accuracy`, or `time-to-target` with `--target` and `--currency`); the runner
never reads the test split for it. Then each study's best configuration is re-run on the suite's seeds with test
metrics and the suite's attacks (`LABEL (tuned)`, `tuning` = {"role": "tuned", "entry", "study", "objective"}),
beside the suite's own configuration on the same seeds (`LABEL (default)` in `show` and the report).

Decisions the issue left open:
* The default runs are exactly the trials `learnbench run` makes (same config, same id; reports call them
  `LABEL (default)` where the entry was tuned, `reports.data.display_labels`): a `run` directory given as --out is
  reused without running its finished trials again, and a report over a run and a tune counts them once.
* Study s's configurations all use seed 10_000 + s (common random numbers: they differ only in hyper-parameters),
  never one of the suite's seeds (checked). Study s of every entry samples with one seed (from the suite name and
  s), so entries whose spaces have the same number of dimensions get the same points of the unit cube.
* A configuration that failed, diverged or (time-to-target) never reached the target scores the worst value and
  stays in the store as it ended. A drawn configuration that the trainer's validate() refuses fails in setup like
  any that raises; only the space's corners are checked up front (an interior point seldom breaks a constraint
  the corners keep).
* A study's best configuration: the best value among its first N, ties broken by a run that finished (done), then
  the higher final validation accuracy (for time-to-target: among configurations that never reached the target,
  the most accurate), then the earlier draw.
* Rounds: every study asks a batch of --workers configurations; the batches of all studies run together through
  the executor (no worker idles while one study's batch finishes), then each configuration is told its score.
* Resume (kill -9, then the same command): Optuna's storage (RUN_DIR/tuning.sqlite) and the results store are
  reused under the run-directory lock. A configuration asked but never told is rebuilt from its stored parameters
  (the same trial id): told at once if its trial ended (done, diverged or failed: a search configuration is never
  run twice), else run again; it forms its study's next round alone, so later draws see the history an
  uninterrupted run saw. The study then continues to N. A larger --trials or --studies in the same directory
  extends the studies; the study names hash what the searches run (base config, space, sampler, objective), so
  changed code or settings start new studies instead of mixing results.
* Exit code 1 when a default or tuned trial failed or diverged; a failed search configuration is part of tuning
  (the report counts it), not an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from . import config, search_space
from .errors import UsageError
from .registry import Registry
from .store import FINISHED, Store
from .studies import Objective, Study, open_storage, study_seed
from .trial import SEARCH, TUNED, StoredTrial, Trial

SEARCH_SEED = 10_000  # study s's configurations run with seed SEARCH_SEED + s
ENDED = ("done", "diverged", "failed")  # a search configuration that ended is told, never run again
KINDS = {search_space.LogUniform: "log-uniform", search_space.Uniform: "uniform", search_space.IntRange: "int",
         search_space.Choice: "choice"}

Execute = Callable[[list[Trial], tuple[str, ...]], None]  # run the trials whose status is not in the tuple


@dataclass(frozen=True)
class Options:
    trials: int
    studies: int
    sampler: str
    objective: Objective


@dataclass
class Search:
    """One entry on one problem: the suite's trials of it (one per seed, as `run` makes them), the entry's own
    values, the trainer's search space, and its studies (opened once the run directory is locked)."""

    label: str
    defaults: list[Trial]
    values: dict[str, Any]
    space: dict[str, search_space.Dimension]
    studies: list[Study] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"tune: {self.label} on {self.defaults[0].dataset} x {self.defaults[0].model_label}"


@dataclass
class Plan:
    """Everything `tune` settles before it writes anything."""

    args: argparse.Namespace
    options: Options
    suite: dict[str, Any]
    defaults: list[Trial]
    """The suite's trials, exactly as `learnbench run` makes them."""
    searches: list[Search]
    registry: Registry
    device: str
    cluster: str | None
    run_dir: Path


def cmd_tune(args: argparse.Namespace) -> int:
    from .workspace import RunDirLock, prepare_run_dir

    plan = prepare(args)
    prepare_run_dir(plan.run_dir)  # the first write: everything above only read
    with RunDirLock(plan.run_dir):
        store = Store(plan.run_dir)
        try:
            final = _tune(plan, store)
        finally:
            store.close()
    bad = sum(status in ("failed", "diverged") for status in final.values())
    print(f"learnbench: results in {plan.run_dir}; `learnbench report {plan.run_dir}` writes the report"
          + (f"; {bad} default or tuned trial(s) failed or diverged" if bad else ""), file=sys.stderr)
    return 1 if bad else 0


def prepare(args: argparse.Namespace) -> Plan:
    """Options, suite, trials, search spaces and cluster, checked; nothing is written (UsageError otherwise)."""
    options = check_options(args)
    suite, defaults, registry, device = _resolve(args)
    searches = plan_searches(suite, defaults, registry, options)
    cluster = None
    if args.executor == "ray":
        from .executor_ray import connect

        cluster = connect(args.address, defaults)  # before the first write: a bad address is exit code 2
    return Plan(args, options, suite, defaults, searches, registry, device, cluster,
                _default_run_dir(args, suite["name"], options))


def check_options(args: argparse.Namespace) -> Options:
    """The tuning options, checked before anything is read or written (UsageError)."""
    for flag, value in (("--trials", args.trials), ("--studies", args.studies), ("--workers", args.workers)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be a positive integer; got {value}")
    if args.objective == "time-to-target":
        if args.target is None or args.currency is None:
            raise UsageError("--objective time-to-target needs --target ACC (a validation accuracy in (0, 1]) and "
                             "--currency flops|seconds|examples")
        if not 0 < args.target <= 1:
            raise UsageError(f"--target is a validation accuracy in (0, 1]; got {args.target}")
    elif args.target is not None or args.currency is not None:
        raise UsageError("--target and --currency go with --objective time-to-target")
    if args.address and args.executor != "ray":
        raise UsageError("--address needs --executor ray")
    return Options(args.trials, args.studies, args.sampler, Objective(args.objective, args.target, args.currency))


def _resolve(args: argparse.Namespace) -> tuple[dict[str, Any], list[Trial], Registry, str]:
    """As `run`: the suite with the command line's overrides, its trials (datasets present), the registry and
    the device."""
    from .cli import _resolve_run, resolve_device
    from .registry import discover

    if args.executor == "ray":
        from .executor_ray import import_ray

        import_ray()  # a missing extra is one line before any work
    # a Ray cluster's GPUs may be on other nodes than this driver's
    device = args.device if args.executor == "ray" and args.device == "cuda" else resolve_device(args.device)
    suite, trials = _resolve_run(args, device)
    return suite, trials, discover(args.plugin), device


def _default_run_dir(args: argparse.Namespace, suite_name: str, options: Options) -> Path:
    """--out, or runs/<suite>-tune, suffixed with a hash when the trials differ from the defaults' (the sampler and
    objective change what is run; --trials and --studies only extend it)."""
    from .cli import _run_dir

    extra = [] if options.sampler == "qmc" and options.objective == Objective() else [
        options.sampler, options.objective.config()]
    return _run_dir(args, suite_name, "-tune", extra)


def plan_searches(suite: dict[str, Any], trials: list[Trial], registry: Registry,
                  options: Options) -> list[Search]:
    """One Search per problem and entry, every search space checked (UsageError) before anything is written."""
    searches: dict[tuple[str, str, str], Search] = {}
    for trial in trials:
        key = (trial.dataset, trial.model_label, trial.label)
        if key not in searches:
            searches[key] = Search(trial.label, [], config.entry_values(suite, trial.label, trial.model_label),
                                   _space(registry, trial))
        searches[key].defaults.append(trial)
    for search in searches.values():
        _check_corners(search, registry)
    clash = sorted({t.seed for t in trials} & {SEARCH_SEED + s for s in range(options.studies)})
    if clash:
        raise UsageError(f"the suite's seeds {clash} are seeds of tuning studies ({SEARCH_SEED} + study); tuning "
                         "never trains on the seeds it reports: use other seeds")
    return list(searches.values())


def _space(registry: Registry, trial: Trial) -> dict[str, search_space.Dimension]:
    """The trainer's declared search space, checked against its hyper-parameters."""
    space = search_space.space_for(registry.entries[trial.algorithm].cls, trial.hparams)
    where = f"tune: algorithm {trial.algorithm!r} (entry {trial.label!r})"
    if not isinstance(space, Mapping) or not space:
        raise UsageError(f"{where} declares no search_space, so it cannot be tuned; leave it out with "
                         "--algorithms")
    try:
        search_space.check(space, trial.hparams, where)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return dict(space)


def _check_corners(search: Search, registry: Registry) -> None:
    """Every corner of the space (each dimension's extremes, every choice) through the resolution and validate()
    a suite entry goes through: a space that contradicts the trainer is a usage error before anything runs."""
    for corner in search_space.corners(search.space):
        config.with_hparams(search.defaults[0], registry, {**search.values, **corner},
                            f"{search.where}: search_space corner {corner}")


def space_config(space: Mapping[str, search_space.Dimension]) -> dict[str, dict[str, Any]]:
    """The space as recorded in a search trial's `tuning.space` (the report reads the kinds: log axes)."""
    out = {}
    for name, dim in space.items():
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(dim).items()}
        out[name] = {"kind": KINDS[type(dim)], **fields}
    return out


def search_trial(search: Search, registry: Registry, study: int, number: int, params: dict[str, Any],
                 sampler: str) -> Trial:
    """Configuration `number` of study `study`: the entry with the drawn values, on the study's seed, scored on
    validation alone (no attacks: they use test points)."""
    tuning = {"role": SEARCH, "entry": search.label, "study": study, "index": number, "sampler": sampler,
              "space": space_config(search.space)}
    return config.with_hparams(search.defaults[0], registry, {**search.values, **params}, search.where,
                               check=False, label=f"{search.label} (search)", seed=SEARCH_SEED + study,
                               robustness={}, tuning=tuning)


def open_studies(searches: list[Search], run_dir: Path, options: Options, suite_name: str) -> None:
    storage = open_storage(run_dir)
    for search in searches:
        template = {k: v for k, v in search.defaults[0].config().items()
                    if k not in ("id", "seed", "label", "hparams", "robustness")}
        key = config.trial_id({**template, "values": search.values, "space": space_config(search.space),
                               "sampler": options.sampler, **options.objective.config()})
        base = search.defaults[0]
        search.studies = [Study(storage, f"{base.dataset}/{base.model_label}/{search.label}/study-{s}/{key}",
                                search.space, options.sampler, study_seed(suite_name, s), options.objective,
                                options.trials) for s in range(options.studies)]


def run_searches(searches: list[Search], registry: Registry, options: Options, store: Store, execute: Execute,
                 width: int) -> None:
    """Round after round until every study has told N configurations (see the module docstring)."""
    rounds = 0
    while True:
        batch = [item for search in searches for item in _round(search, registry, options, width)]
        if not batch:
            return
        rounds += 1
        trials = [trial for _, _, trial in batch]
        store.add_trials(trials)
        print(f"learnbench tune: round {rounds}: {len(batch)} configuration(s)", file=sys.stderr)
        execute(trials, ENDED)
        _tell(batch, store, options.objective)


def _round(search: Search, registry: Registry, options: Options, width: int) -> list[tuple[Study, int, Trial]]:
    """Each study's configurations of this round: those a killed run asked and never told, else a new batch."""
    out = []
    for s, study in enumerate(search.studies):
        drawn = study.interrupted() or study.ask(width)
        out += [(study, number, search_trial(search, registry, s, number, params, options.sampler))
                for number, params in drawn]
    return out


def _tell(batch: list[tuple[Study, int, Trial]], store: Store, objective: Objective) -> None:
    stored = {t.id: t for t in store.trials()}
    for study, number, trial in batch:
        curve = store.curves(trial.id, "val/accuracy").get(trial.id, []) if objective.target is not None else []
        study.tell(number, objective.score(stored[trial.id], curve))


def tuned_trials(searches: list[Search], registry: Registry, options: Options, store: Store) -> list[Trial]:
    """Each study's best configuration on the suite's seeds (the default trials with its hyper-parameters)."""
    stored = {t.id: t for t in store.trials()}
    out = []
    for search in searches:
        for s, study in enumerate(search.studies):
            best = _best(search, registry, options, s, study, stored)
            if best is None:
                continue
            _say_best(search, s, best, len(study.told()))
            tuning = {"role": TUNED, "entry": search.label, "study": s, **options.objective.config()}
            for default in search.defaults:
                trial = dataclasses.replace(default, hparams=best.hparams, label=f"{search.label} (tuned)",
                                            tuning=tuning, id="")
                out.append(dataclasses.replace(trial, id=config.trial_id(trial.config())))
    return out


def _best(search: Search, registry: Registry, options: Options, s: int, study: Study,
          stored: Mapping[str, StoredTrial]) -> StoredTrial | None:
    """The study's best told configuration (ties: done, then higher validation accuracy, then drawn first)."""
    sign = 1.0 if options.objective.direction == "maximize" else -1.0
    ranked = []
    for told in study.told():
        trial = stored.get(search_trial(search, registry, s, told.number, dict(told.params), options.sampler).id)
        if trial is not None:
            val = trial.metrics.get("val/accuracy")
            key = (trial.status == "done", sign * float(told.value), -1.0 if val is None else val, -told.number)
            ranked.append((key, trial))
    return max(ranked, key=lambda r: r[0])[1] if ranked else None


def _say_best(search: Search, s: int, best: StoredTrial, n: int) -> None:
    chosen = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in best.hparams.items() if k in search.space)
    val = best.metrics.get("val/accuracy")
    print(f"learnbench tune: {search.where.removeprefix('tune: ')}, study {s}: best of {n}: {chosen} "
          f"({best.status}, val accuracy {'–' if val is None else f'{100 * val:.2f}%'})", file=sys.stderr)


def _tune(plan: Plan, store: Store) -> dict[str, str]:
    """Inside the locked run directory: the searches, then the default and tuned runs and the post-run attacks.
    Returns the final status of every default and tuned trial."""
    from .cli import _post_run
    from .executor import default_workers
    from .machine import default_threads, usable_cpus

    args, options = plan.args, plan.options
    width = args.workers or default_workers(sys.maxsize, plan.device)
    threads = default_threads(width) if plan.device == "cpu" else usable_cpus()
    _record_run(plan, store)
    where = plan.cluster if args.executor == "ray" else f"{width} worker(s) x {threads} thread(s)"
    print(f"learnbench tune: {len(plan.searches)} algorithm(s) x problem(s), {options.studies} studies x "
          f"{options.trials} configurations each ({options.sampler}, {options.objective.name}) -> {plan.run_dir} "
          f"[{plan.device}, {where}]", file=sys.stderr)
    execute = _executor(args, store, plan.run_dir, width, threads)
    open_studies(plan.searches, plan.run_dir, options, plan.suite["name"])
    run_searches(plan.searches, plan.registry, options, store, execute, width)
    final = plan.defaults + tuned_trials(plan.searches, plan.registry, options, store)
    store.add_trials(final)
    print(f"learnbench tune: {len(final)} default and tuned runs on the suite's seeds", file=sys.stderr)
    execute(final, FINISHED)
    _post_run(store, plan.run_dir, plan.device, final, args.data_dir)
    _summary(plan, store, final)
    statuses = store.statuses()
    return {t.id: statuses[t.id] for t in final}


def _record_run(plan: Plan, store: Store) -> None:
    """The run's info (as `run` records it, plus the tuning settings), and the default trials first, so reports
    list them before the tuned ones."""
    from . import __version__

    options = plan.options
    store.set_run_info({"suite": plan.suite["name"], "suite_config": plan.suite, "learnbench": __version__,
                        "argv": sys.argv[1:], "device": plan.device,
                        "created": store.run_info().get("created", time.time()), "updated": time.time(),
                        "tuning": {"trials": options.trials, "studies": options.studies, "sampler": options.sampler,
                                   **options.objective.config()}})
    store.add_trials(plan.defaults)


def _summary(plan: Plan, store: Store, final: list[Trial]) -> None:
    """`show`'s table of this command's default and tuned trials, and the count of its search trials."""
    from .reports import show_table

    ids, labels = {t.id for t in final}, {s.label for s in plan.searches}
    print(show_table([t for t in store.trials()
                      if t.id in ids or (t.is_search and t.tuning and t.tuning.get("entry") in labels)]))


def _executor(args: argparse.Namespace, store: Store, run_dir: Path, workers: int, threads: int) -> Execute:
    """Runs trials on the command's executor, skipping those whose stored status is one of `finished`."""
    from .cli import execute_with_progress

    def execute(trials: list[Trial], finished: tuple[str, ...]) -> None:
        statuses = store.statuses()
        pending = [t for t in trials if statuses.get(t.id) not in finished]
        execute_with_progress(args, store, run_dir, len(trials), pending, workers, threads)

    return execute
