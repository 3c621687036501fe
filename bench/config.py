"""Suites: TOML files -> validated, resolved trials (datasets x models x algorithms x seeds), and the trial id.

A suite file:

    name = "quick"
    datasets = ["digits"]
    seeds = 3                       # or an explicit list [0, 1, 2]
    reference = "backprop"          # the reference algorithm (label or id): report targets, transfer attacks
    [[models]]                      # one or more; a single [model] table works too
    kind = "mlp"
    hidden = [64]
    budget = { time_s = 300 }       # optional: this problem's budget (dataset x model), shared by every entry
    [budget]                        # whichever comes first: steps, epochs, time_s, flops (nominal)
    epochs = 20
    [eval]                          # evaluation cadence (off the clock)
    points = 20
    [robustness]                    # see learnbench.attacks.robustness
    examples = 500
    [diagnostics]                   # probes run every N steps, off the clock
    every = 0
    [resources]                     # per trial, where it runs (not part of the trial id)
    cpus = 1                        # Ray num_cpus and torch threads (default: the executor's threads per trial)
    gpus = 0.5                      # Ray num_gpus (default: 1 on CUDA, 0 on CPU)
    actors = 4                      # Ray actors (one CPU each) that evaluate population methods' members
                                    # (`learnbench.population_ray`); 0 (default): in process
    data_parallel = 2               # processes per trial (DDP, `learnbench.data_parallel`); 1 (default): one.
                                    # An entry's own `data_parallel = N` overrides it; part of the trial id
    [[algorithms]]
    id = "backprop"                 # registry id
    label = "backprop-adam"         # optional, defaults to id; distinguishes two entries of one algorithm
    models = ["mlp-64x1"]           # optional: only these model labels
    datasets = ["mnist"]            # optional: only these datasets
    optimizer = "adam"              # every other key is a hyper-parameter
    # budget = { time_s = 60 }      # an entry's own budget, unlike the problem's, needs `unranked = true`:
    # unranked = true               # its trials are reported beside the others, never ranked or tested with them

A problem (dataset x model) has one budget that every algorithm on it shares: the model's `budget`, else the
suite's. An entry may deviate only by saying so (`unranked = true`).

`--set key=value` edits the resolved suite before validation: `budget.epochs=5` (the `budget.*` items
together replace every budget, the suite's, each model's and each entry's: `budget.time_s=900` alone is 900 s for
every trial, with no epoch limit left from the suite), `model.kind=cnn` (any `model.*` key replaces the models with one), `robustness.examples=0`, `eval.points=10`,
`diagnostics.every=50`, `resources.cpus=2`, `resources.gpus=1`, `resources.actors=4`,
`<label or id>.<hyper-parameter>=value`. An unknown key is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import json
import math
from typing import Any

from . import checks
from . import models as models_mod
from .errors import UsageError, did_you_mean
from .identity import code_digests
from .registry import Registry, hparam_defaults, resolve_hparams
from .suite_files import ENTRY_KEYS, SET_HEADS, apply_overrides, builtin_suites, load_suite, parse_value, resolve_paths
from .trial import DEFAULT_REFERENCE, NOT_HASHED, Budget, DiagnosticsSettings, EvalSettings, Trial

__all__ = ["ENTRY_KEYS", "SET_HEADS", "apply_overrides", "budget_lines", "builtin_suites", "entry_values",
           "load_suite", "parse_value", "resolve", "resolve_paths", "trial_id", "with_hparams"]

TOP_KEYS = {"name", "description", "datasets", "seeds", "models", "model", "budget", "eval", "robustness",
            "diagnostics", "algorithms", "resources", "reference",
            "log"}  # [log]: experiment trackers (learnbench.trackers), read by `run`; no trial depends on it
BUDGET_KEYS = ("steps", "epochs", "time_s", "flops")
EVAL_DEFAULTS = {"points": 20, "batch_size": 2048}
DIAGNOSTICS_DEFAULTS = {"every": 0, "probes": []}
RESOURCE_KEYS = ("cpus", "gpus", "actors", "data_parallel")  # where one trial runs: not hashed (Trial.resources),
# but data_parallel, which also changes the summation order and the cost, becomes the hashed Trial.data_parallel


# --- resolution --------------------------------------------------------------------------------------------------

def resolve(suite: dict[str, Any], registry: Registry, device: str, code_version: str) -> list[Trial]:
    """Validate a suite and expand it into trial configs (see ARCHITECTURE.md); every error is a UsageError."""
    from .attacks.robustness import resolve_settings as attacks_settings  # local: keeps this import light
    from .datasets import fingerprint as datasets_fingerprint, info as datasets_info

    where = f"suite {suite.get('name')!r}"
    unknown = set(suite) - TOP_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}"
                         f"{did_you_mean(sorted(unknown), TOP_KEYS)}; known: {', '.join(sorted(TOP_KEYS))}")
    dataset_names = checks.names(suite.get("datasets", ["digits"]), f"{where}: datasets")
    infos = {name: datasets_info(name) for name in dataset_names}
    seeds = _seeds(suite.get("seeds", 1), where)
    problems = _problems(suite, where)
    entries = suite.get("algorithms")
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{where}: needs at least one [[algorithms]] entry")
    entries = _swept_entries(entries, registry, where)  # each [[algorithms]] entry, its sweep expanded
    shared = {"suite": suite.get("name"), "device": device, "reference": _reference(suite, where),
              "eval": EvalSettings(**_table(suite.get("eval", {}), EVAL_DEFAULTS, f"{where}: eval")),
              "diagnostics": _diagnostics(suite.get("diagnostics", {}), where),
              "resources": _resources(suite.get("resources", {}), f"{where}: resources")}
    trials = []
    for dataset in dataset_names:
        robustness = attacks_settings(suite.get("robustness", {}), dataset, infos[dataset].input_shape)
        data = datasets_fingerprint(dataset)  # your own data's content hash; None for a built-in
        for spec, budget in problems:
            model_label = models_mod.label(spec)
            if spec["kind"] == "factory":  # the user's code: imported and built once before anything runs
                models_mod.check_factory(spec, infos[dataset].input_shape, infos[dataset].n_classes,
                                         f"{where}: {dataset} x {model_label}")
            factory_code = models_mod.factory_digests(spec)
            for resolved in entries:
                if (resolved["models"] is not None and model_label not in resolved["models"]) or (
                        resolved["datasets"] is not None and dataset not in resolved["datasets"]):
                    continue
                entry_budget = _entry_budget(resolved, budget, f"{where}: {dataset} x {model_label}")
                hparams = _fill_horizon(dict(resolved["hparams"]), entry_budget, infos[dataset].n_train)
                cls, entry_where = registry.entries[resolved["id"]].cls, f"{where}: [[algorithms]] {resolved['label']!r}"
                trainer = _construct(cls, hparams)  # None: its constructor refuses them, which fails its own trial
                _check_model(trainer or cls, spec, model_label, entry_where)
                _check_values(cls, hparams, infos[dataset], device, entry_where, trainer)
                processes = resolved["data_parallel"] or shared["resources"]["data_parallel"]
                _check_data_parallel(trainer, processes, hparams, device, entry_where)
                for seed in seeds:
                    trial = Trial(
                        **shared, id="", label=resolved["label"], algorithm=resolved["id"], hparams=hparams,
                        dataset=dataset, model=spec, model_label=model_label, budget=entry_budget,
                        unranked=resolved["unranked"], sweep=resolved["sweep"], seed=seed, robustness=robustness,
                        code={"learnbench": code_version, "modules": {**resolved["code"], **factory_code}},
                        plugin=resolved["plugin"], data=data, data_parallel=processes)
                    trials.append(dataclasses.replace(trial, id=trial_id(trial.config())))
    if not trials:
        raise UsageError(f"{where}: no trials (check the algorithms' `models` and `datasets` filters against the "
                         "model labels and datasets)")
    return _unique(trials)


def _problems(suite: dict[str, Any], where: str) -> list[tuple[dict[str, Any], Budget]]:
    """Each model spec with its problem budget: the model's own `budget` table, else the suite's [budget]."""
    suite_budget = _budget(suite["budget"], f"{where}: budget") if "budget" in suite else None
    problems = []
    for spec, budget in _model_specs(suite, where):
        label = models_mod.label(spec)
        if budget is None and suite_budget is None:
            raise UsageError(f"{where}: model {label} has no budget; give the suite a [budget] table or the "
                             "model a budget = {...}")
        problems.append((spec, suite_budget if budget is None else _budget(budget, f"{where}: {label}.budget")))
    return problems


def budget_lines(trials: list[Trial]) -> list[str]:
    """One line per problem (dataset x model): the budget its ranked trials share, then each entry whose own budget
    differs (unranked), e.g. `mnist x mlp-32x1: time_s = 900; ga-short: time_s = 60 (own budget, unranked)`."""
    problems: dict[tuple[str, str], list[Trial]] = {}
    for trial in trials:
        problems.setdefault((trial.dataset, trial.model_label), []).append(trial)
    lines = []
    for (dataset, model_label), group in problems.items():
        shared = next((t.budget for t in group if not t.unranked), None)  # `resolve` made them all equal
        text = "no ranked entry" if shared is None else shared.text()
        if shared is not None and len(shared.limits()) > 1:
            text += " (whichever comes first)"
        own = {t.label: t.budget for t in group if t.budget != shared}
        lines.append(f"{dataset} x {model_label}: {text}"
                     + "".join(f"; {label}: {budget.text()} (own budget, unranked)" for label, budget in own.items()))
    return lines


def _entry_budget(resolved: dict[str, Any], problem_budget: Budget, where: str) -> Budget:
    """The problem's budget, or the entry's own when it says it is not to be ranked with the others."""
    if resolved["budget"] is None:
        return problem_budget
    own = _budget(resolved["budget"], f"{where}: {resolved['label']}.budget")
    if own != problem_budget and not resolved["unranked"]:
        raise UsageError(f"{where}: entry {resolved['label']!r} sets its own budget {own.text()}, unlike "
                         f"the problem's {problem_budget.text()}; every algorithm on a problem shares one "
                         "budget. Set the budget on the model, or add unranked = true to report this entry beside "
                         "the others without ranking it")
    return own


def _reference(suite: dict[str, Any], where: str) -> str:
    reference = suite.get("reference", DEFAULT_REFERENCE)
    if not isinstance(reference, str) or not reference:
        raise UsageError(f"{where}: reference must be an algorithm label or id; got {reference!r}")
    return reference


def _construct(cls: type, hparams: dict[str, Any]) -> Any:
    """The trainer built with an entry's hyper-parameters, or None when its constructor refuses them (that fails the
    trial itself, with the constructor's message)."""
    try:
        return cls(**hparams)
    except Exception:  # noqa: BLE001
        return None


def _check_model(trainer: Any, spec: dict[str, Any], model_label: str, where: str) -> None:
    """A usage error before anything runs when the trainer declares `supported_models` (model kinds) and this
    problem's model is not one of them (a rule defined for MLPs only, say); trainers without it take any model.
    `trainer` is the one built with the entry's hyper-parameters (else its class), so the kinds may depend on them (a
    property: forward-gradient's activity perturbation needs an mlp, its weight perturbation takes any model)."""
    supported = getattr(trainer, "supported_models", None)
    cls = trainer if isinstance(trainer, type) else type(trainer)
    if supported is not None and spec.get("kind") not in supported:
        raise UsageError(f"{where}: {cls.name} trains {', '.join(map(repr, supported))} models only, not "
                         f"{model_label} (kind {spec.get('kind')!r}); restrict the entry with `models = [...]`")


def _check_values(cls: type, hparams: dict[str, Any], info: Any, device: str, where: str,
                  trainer: Any = None) -> None:
    """Run the trainer's optional `validate([task])` on the hyper-parameters before anything is written, so a bad
    value (a negative learning rate, an odd mirrored population) is a usage error, not a run of failed trials. Only
    ValueError counts: `setup` validates again, with the model in hand, what needs it."""
    validate = getattr(cls, "validate", None)
    if not callable(validate):
        return
    import torch

    from .spec import TaskInfo

    trainer = trainer if trainer is not None else _construct(cls, hparams)
    if trainer is None:
        return
    takes_task = len(inspect.signature(validate).parameters) > 1  # (self, task)
    task = TaskInfo(info.input_shape, info.n_classes, info.n_train, torch.device(device))
    try:
        trainer.validate(task) if takes_task else trainer.validate()
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None


def _check_data_parallel(trainer: Any, processes: int, hparams: dict[str, Any], device: str, where: str) -> None:
    """A data-parallel entry: a trainer that says it supports it, a batch that splits evenly, a GPU per process."""
    if processes == 1:
        return
    if not getattr(trainer, "supports_data_parallel", False):
        raise UsageError(f"{where}: data_parallel = {processes}, but this trainer does not run data-parallel "
                         "(backprop with a first-order optimizer does; see learnbench.data_parallel)")
    if hparams.get("batch_size", 0) % processes:
        raise UsageError(f"{where}: batch_size {hparams.get('batch_size')} does not split into {processes} equal "
                         "shards; make it a multiple of data_parallel")
    if device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < processes:
            raise UsageError(f"{where}: data_parallel = {processes} on CUDA needs a GPU per process; "
                             f"{torch.cuda.device_count()} visible")


def _model_specs(suite: dict[str, Any], where: str) -> list[tuple[dict[str, Any], Any]]:
    """The suite's [[models]] (or its single [model]; default an mlp), each normalised with its defaults, with its
    own `budget` table (None when it has none)."""
    model_specs = suite.get("models") or ([suite["model"]] if "model" in suite else [{"kind": "mlp"}])
    if not isinstance(model_specs, list) or not all(isinstance(m, dict) for m in model_specs):
        raise UsageError(f"{where}: models must be a list of tables ([[models]])")
    return [(models_mod.normalize_spec({k: v for k, v in m.items() if k != "budget"}), m.get("budget"))
            for m in model_specs]


def _diagnostics(table: Any, where: str) -> DiagnosticsSettings:
    """The [diagnostics] table with its defaults; every probe name must be one of `learnbench.diagnostics.PROBES`."""
    from .diagnostics import PROBES

    diag_cfg = _table(table, DIAGNOSTICS_DEFAULTS, f"{where}: diagnostics")
    unknown_probes = [p for p in diag_cfg["probes"] if p not in PROBES]
    if unknown_probes:
        raise UsageError(f"{where}: unknown diagnostics probe(s) {', '.join(unknown_probes)}; "
                         f"known: {', '.join(sorted(PROBES))}")
    return DiagnosticsSettings(diag_cfg["every"], tuple(diag_cfg["probes"]))


def trial_id(trial: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of everything that defines the experiment, `trial` being a trial's config JSON
    object (`Trial.config()`); the suite name and the resources it runs on (`cpus`, `gpus`, `actors`) do not."""
    body = {k: v for k, v in trial.items() if k not in NOT_HASHED}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _entry(entry: Any, registry: Registry, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
        raise UsageError(f"{where}: every [[algorithms]] entry needs id = \"<algorithm>\"; got {entry!r}")
    reg = registry.get(entry["id"])
    label = entry.get("label", entry["id"])
    if not isinstance(label, str):
        raise UsageError(f"{where}: label must be a string; got {label!r}")
    given = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    models, datasets = entry.get("models"), entry.get("datasets")
    if models is not None:
        models = checks.names(models, f"{where}: {label}.models")
    if datasets is not None:
        datasets = checks.names(datasets, f"{where}: {label}.datasets")
    unranked = entry.get("unranked", False)
    if not isinstance(unranked, bool):
        raise UsageError(f"{where}: {label}.unranked must be true or false; got {unranked!r}")
    data_parallel = entry.get("data_parallel")
    if data_parallel is not None:
        data_parallel = _processes(data_parallel, f"{where}: {label}.data_parallel")
    return {"id": reg.name, "label": label, "models": models, "datasets": datasets, "budget": entry.get("budget"),
            "unranked": unranked, "data_parallel": data_parallel,
            "hparams": resolve_hparams(reg.cls, given, f"{where}: [[algorithms]] {label!r}"),
            "code": code_digests(reg.cls), "plugin": reg.provenance()}


def _swept_entries(entries: list[Any], registry: Registry, where: str) -> list[dict[str, Any]]:
    """Every [[algorithms]] entry resolved by `_entry`, an entry with `sweep = { lr = [0.05, 0.1], ... }` expanded
    into one ordinary entry per point of the cartesian product of its lists (keys in the table's order, each list in
    its order), labelled `<label> lr=0.05` (floats as %g) and marked `sweep = {"entry": <label>, "values": {"lr":
    0.05}}` (`Trial.sweep`; None for an entry without a sweep). A swept key must be a hyper-parameter of the
    trainer and not also fixed (in the file or by `--set <label>.<key>`: a usage error; `--set <label>.sweep=...`
    replaces the sweep); each value goes through the ordinary hyper-parameter checks of its entry."""

    def show(value: Any) -> str:  # 0.05, 1e-05, 32, true, adam, [64, 64]
        return f"{value:g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, bool) else (
            str(value))

    out = []
    for entry in entries:
        label = entry.get("label", entry.get("id")) if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or "sweep" not in entry or not isinstance(entry.get("id"), str) or not (
                isinstance(label, str)):
            out.append({**_entry(entry, registry, where), "sweep": None})  # `_entry` rejects a bad entry
            continue
        sweep, known = entry["sweep"], list(hparam_defaults(registry.get(entry["id"]).cls))
        spot = f"{where}: [[algorithms]] {label!r}: sweep"
        if not isinstance(sweep, dict) or not sweep or not all(isinstance(v, list) and v for v in sweep.values()):
            raise UsageError(f"{spot} must be a table of non-empty lists, e.g. sweep = {{ lr = [0.05, 0.1] }}; "
                             f"got {sweep!r}")
        unknown = [k for k in sweep if k not in known]
        if unknown:
            raise UsageError(f"{spot}: {', '.join(unknown)} not a hyper-parameter of {entry['id']!r}"
                             f"{did_you_mean(unknown, known)}; known: {', '.join(known)}")
        both = [k for k in sweep if k in entry]
        if both:
            raise UsageError(f"{spot}: {', '.join(both)} both fixed and swept (a value in the entry or a --set "
                             f"{label}.{both[0]}=...); give one or the other (--set {label}.sweep=... replaces the "
                             "sweep)")
        repeated = [k for k, v in sweep.items() if len({json.dumps(x, sort_keys=True) for x in v}) < len(v)]
        if repeated:
            raise UsageError(f"{spot}: {', '.join(repeated)} lists a value twice")
        fixed = {k: v for k, v in entry.items() if k not in ("sweep", "label")}
        for point in itertools.product(*sweep.values()):
            values = dict(zip(sweep, point))
            text = " ".join(f"{k}={show(v)}" for k, v in values.items())
            out.append({**_entry({**fixed, **values, "label": f"{label} {text}"}, registry, where),
                        "sweep": {"entry": label, "values": values}})
    return out


def entry_values(suite: dict[str, Any], label: str, model_label: str) -> dict[str, Any]:
    """The hyper-parameter values, as the suite gives them (what `resolve` fills defaults into), of the one
    [[algorithms]] entry with this label that applies to this model: the base a tuner's suggestions update. Two
    entries may share a label on different models (the mnist suite's backprop on the cnn and on the MLP). Call it on
    a suite `resolve` accepted."""
    matches = [entry for entry in suite.get("algorithms", []) if entry.get("label", entry["id"]) == label
               and (entry.get("models") is None or model_label in entry["models"])]
    if len(matches) != 1:
        raise UsageError(f"suite {suite.get('name')!r}: {len(matches)} [[algorithms]] entries labelled {label!r} "
                         f"apply to model {model_label}; give each its own label to tune them")
    return {k: v for k, v in matches[0].items() if k not in ENTRY_KEYS}


def with_hparams(trial: Trial, registry: Registry, given: dict[str, Any], where: str, check: bool = True,
                 **fields: Any) -> Trial:
    """`trial` with its hyper-parameters resolved again from `given` (as a suite entry's values: defaults, types,
    `horizon_steps` from the trial's budget, and the trainer's `validate()` when `check`) and `fields` replaced
    (label, seed, tuning, ...), under its new id: how `learnbench tune` makes its configurations."""
    from .datasets import info as datasets_info

    cls = registry.entries[trial.algorithm].cls
    info = datasets_info(trial.dataset)
    hparams = _fill_horizon(resolve_hparams(cls, given, where), trial.budget, info.n_train)
    if check:
        _check_values(cls, hparams, info, trial.device, where)
    changed = dataclasses.replace(trial, **fields, hparams=hparams, id="")
    return dataclasses.replace(changed, id=trial_id(changed.config()))


def _fill_horizon(hparams: dict[str, Any], budget: Budget, n_train: int) -> dict[str, Any]:
    """`horizon_steps = None` -> the number of steps the step/epoch budget allows (for cosine/one-cycle)."""
    if "horizon_steps" in hparams and hparams["horizon_steps"] is None:
        limits = []
        if budget.steps:
            limits.append(int(budget.steps))
        if budget.epochs and isinstance(hparams.get("batch_size"), int) and hparams["batch_size"] > 0:
            limits.append(math.ceil(budget.epochs * n_train / hparams["batch_size"]))
        if limits:
            hparams["horizon_steps"] = min(limits)
    return hparams


def _budget(table: Any, where: str) -> Budget:
    """A budget table (`where` names it: "suite 'x': budget"); at least one limit, each a positive number."""
    table = checks.known_keys(table, BUDGET_KEYS, where)
    out = {key: None if table.get(key) is None else checks.number(table[key], f"{where}.{key}")
           for key in BUDGET_KEYS}
    if all(v is None for v in out.values()):
        raise UsageError(f"{where} needs at least one of {', '.join(BUDGET_KEYS)}")
    if out["steps"] is not None and out["steps"] != int(out["steps"]):
        raise UsageError(f"{where}.steps must be a whole number; got {table['steps']!r}")
    return Budget(**{key: table.get(key) for key in BUDGET_KEYS})


def _table(table: Any, defaults: dict[str, Any], where: str) -> dict[str, Any]:
    out = {**defaults, **checks.known_keys(table, defaults, where)}
    for key, default in defaults.items():
        if isinstance(default, int):
            checks.integer(out[key], f"{where}.{key}")
        if isinstance(default, list):
            out[key] = checks.names(out[key], f"{where}.{key}")
    return out


def _resources(table: Any, where: str) -> dict[str, float | None]:
    """cpus and gpus: None = the executor's default; actors: 0 = population members evaluated in process."""
    table = checks.known_keys(table, RESOURCE_KEYS, where)
    out = {key: table.get(key) for key in RESOURCE_KEYS}
    if out["cpus"] is not None:
        checks.number(out["cpus"], f"{where}.cpus")
    if out["gpus"] is not None:
        checks.number(out["gpus"], f"{where}.gpus", low_inclusive=True)
    out["actors"] = checks.integer(table.get("actors", 0), f"{where}.actors")
    out["data_parallel"] = _processes(table.get("data_parallel", 1), f"{where}.data_parallel")
    return out


def _processes(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{where} must be a whole number of processes >= 1; got {value!r}")
    return value


def _seeds(value: Any, where: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise UsageError(f"{where}: seeds must be a positive count or a list of seeds; got {value!r}")
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                 for s in value):
        return sorted(set(value))
    raise UsageError(f"{where}: seeds must be a positive count or a list of non-negative integers; got {value!r}")


def _unique(trials: list[Trial]) -> list[Trial]:
    seen, out = set(), []
    for t in trials:
        if t.id not in seen:
            seen.add(t.id)
            out.append(t)
    return out
