"""The records that cross modules: a resolved trial, a trial as the store returns it, a point of a curve.

`config.resolve` turns a suite into `Trial`s; executors pass them (as their JSON config) to `runner.run_trial`,
which returns a `TrialResult`; the store keeps the config JSON and returns `StoredTrial`s: the same fields as a
`Trial` (the config flattened, not nested), plus status, error, final metrics and provenance. Reports read those.

`Trial.config()` is the JSON object stored in `trials.config`; its hash, without the keys in `NOT_HASHED`, is the
trial id (`config.trial_id`). Old stores whose config lacks a newer key load with that key's default.

`Trial.tuning` marks the trials of `learnbench tune` (`learnbench.tune`): None for an ordinary trial (and then absent
from the config, so an ordinary trial's config and id are what they were before tuning existed); for a search
configuration `{"role": "search", "entry": LABEL, "study": s, "index": i, "sampler": "qmc", "space": {name:
{"kind": "log-uniform", "low": ..., "high": ...}, ...}}`, which the runner evaluates on validation only (the test
split is never read) and the reports keep out of their main sections; for a study's best configuration re-run on the
suite's seeds `{"role": "tuned", "entry": LABEL, "study": s, "objective": ...}`.

`Trial.sweep` marks the trials of a suite entry's `sweep = {lr = [...]}` (`config._swept_entries`): None for an
ordinary trial (absent from the config, like `tuning`); else `{"entry": LABEL, "values": {"lr": 0.05}}`, the entry's
own label (the trial's label is `LABEL lr=0.05`) and this trial's value of each swept hyper-parameter, in the
sweep's order. Reports draw one figure per swept hyper-parameter from it (`reports.sweeps`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

NOT_HASHED = ("id", "suite", "resources", "reference", "unranked")  # keys that do not change the experiment
STATUSES = ("pending", "running", "done", "failed", "diverged")
SEARCH, TUNED = "search", "tuned"  # `Trial.tuning["role"]` of a tuning configuration and of a best-configuration rerun
CURRENCIES = ("epochs", "time_s", "flops")  # budgets that mean the same cost for every algorithm (not steps)
DEFAULT_REFERENCE = "backprop"  # a suite's default `reference` (a setting, never a branch in the harness)


@dataclass(frozen=True)
class Budget:
    """Whichever comes first; None = no limit of that kind."""

    steps: int | None = None
    epochs: float | None = None
    time_s: float | None = None
    flops: float | None = None
    """Nominal FLOPs (`learnbench.cost`)."""

    def limits(self) -> dict[str, float]:
        """The limits that are set, e.g. {"time_s": 300}."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def text(self) -> str:
        """`time_s = 300`, or `epochs = 15, time_s = 3` when several limits are set."""
        return ", ".join(f"{k} = {v:g}" for k, v in self.limits().items()) or "no budget"

    def currency(self) -> str | None:
        """The one cost currency the budget is stated in, or None (steps, or several limits)."""
        limits = list(self.limits())
        return limits[0] if len(limits) == 1 and limits[0] in CURRENCIES else None


@dataclass(frozen=True)
class EvalSettings:
    """Evaluation cadence (off the clock): `points` evaluations spread over the budget; 0 = final only."""

    points: int = 20
    batch_size: int = 2048


@dataclass(frozen=True)
class DiagnosticsSettings:
    """Probes (`learnbench.diagnostics.PROBES`) run every `every` steps, off the clock; 0 = none."""

    every: int = 0
    probes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Trial:
    """One resolved trial: everything that defines the experiment, plus where and how it is reported."""

    id: str
    label: str
    """The suite entry's label (defaults to the algorithm id); reports group by it."""
    algorithm: str
    """The registry id of the trainer."""
    hparams: Mapping[str, Any]
    dataset: str
    model: Mapping[str, Any]
    """The normalised model spec (`learnbench.models.normalize_spec`)."""
    model_label: str
    budget: Budget
    seed: int
    device: str = "cpu"
    eval: EvalSettings = EvalSettings()
    robustness: Mapping[str, Any] = field(default_factory=dict)
    """Resolved attack settings (`learnbench.attacks.robustness.resolve_settings`); {} = no attacks."""
    diagnostics: DiagnosticsSettings = DiagnosticsSettings()
    code: Mapping[str, Any] = field(default_factory=dict)
    """`{"learnbench": version, "modules": {module: SHA-256 prefix}}` (`learnbench.identity`)."""
    plugin: Mapping[str, Any] = field(default_factory=dict)
    """The trainer's provenance (`registry.Entry.provenance`): distribution, version, plugin file and digest."""
    suite: str | None = None
    resources: Mapping[str, Any] = field(default_factory=dict)
    reference: str = DEFAULT_REFERENCE
    """The suite's reference algorithm (label or id): report targets, transfer-attack source."""
    unranked: bool = False
    """The suite gave this entry its own budget: reported beside the others, never ranked with them."""
    tuning: Mapping[str, Any] | None = None
    """`learnbench tune`'s mark (see the module docstring): None for an ordinary trial."""
    sweep: Mapping[str, Any] | None = None
    """A suite sweep's mark (see the module docstring): None for an ordinary trial."""
    data_parallel: int = 1
    """Processes that run this one trial (`learnbench.data_parallel`: DDP, each on its shard of every batch); part
    of the id when above 1 (the gradients' summation order and the cost differ), absent from the config at 1."""
    data: Mapping[str, Any] | None = None
    """Your own data's identity (`learnbench.datasets.fingerprint`: the SHA-256 of a `.npz` file or a plugin's
    arrays): None for a built-in dataset (and then absent from the config, like `tuning`)."""

    def config(self) -> dict[str, Any]:
        """The JSON object stored in the results store (and sent to worker processes)."""
        out = dataclasses.asdict(self)  # nested dataclasses become dicts; tuples stay tuples (JSON lists)
        out["diagnostics"]["probes"] = list(self.diagnostics.probes)
        if self.tuning is None:  # an ordinary trial keeps the config (and so the id) it had before tuning existed
            del out["tuning"]
        if self.sweep is None:  # likewise before sweeps existed
            del out["sweep"]
        if self.data is None:  # likewise for built-in datasets
            del out["data"]
        if self.data_parallel == 1:  # likewise for one process
            del out["data_parallel"]
        return out

    @property
    def tuning_role(self) -> str | None:
        """`search`, `tuned`, or None for an ordinary trial."""
        return self.tuning.get("role") if self.tuning else None

    @property
    def is_search(self) -> bool:
        """A tuning search configuration: scored on validation only; the test split is never read for it."""
        return self.tuning_role == SEARCH

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Trial:
        """The inverse of `config()`; keys a newer version added take their defaults, unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(Trial)}
        values = {k: v for k, v in config.items() if k in names}
        values["budget"] = Budget(**config["budget"])
        values["eval"] = EvalSettings(**config.get("eval", {}))
        diagnostics = config.get("diagnostics") or {}
        values["diagnostics"] = DiagnosticsSettings(diagnostics.get("every", 0), tuple(diagnostics.get("probes", ())))
        return cls(**values)

    def describe(self) -> str:
        """`backprop mnist mlp-256x2 s0`: how progress bars and messages name a trial."""
        return f"{self.label} {self.dataset} {self.model_label} s{self.seed}"


class CurvePoint(NamedTuple):
    """One row of a learning curve or a probe's history: where the trial was (its costs) and what was measured."""

    step: int
    examples: int
    flops: float
    """Nominal FLOPs so far."""
    train_seconds: float
    metric: str
    value: float


@dataclass(frozen=True)
class TrialResult:
    """What `runner.run_trial` returns: JSON-able through `json_dict` / `from_json_dict` (worker pipes, Ray)."""

    id: str
    status: str
    error: str | None
    metrics: Mapping[str, float]
    curves: tuple[CurvePoint, ...]
    provenance: Mapping[str, Any]

    def json_dict(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "error": self.error, "metrics": dict(self.metrics),
                "curves": [list(point) for point in self.curves], "provenance": dict(self.provenance)}

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> TrialResult:
        return cls(data["id"], data["status"], data["error"], data["metrics"],
                   tuple(CurvePoint(*row) for row in data["curves"]), data["provenance"])

    @classmethod
    def lost(cls, trial_id: str, reason: str) -> TrialResult:
        """A trial whose worker died: failed, with the reason, nothing measured."""
        return cls(trial_id, "failed", reason, {}, (), {})


@dataclass(frozen=True)
class StoredTrial(Trial):
    """A trial as the store returns it: the config's fields, its state and its final values."""

    status: str = "pending"
    error: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    """Final metrics by name: `test/accuracy`, `cost/flops`, `robust/pgd-linf/0.1`, ..."""
    provenance: Mapping[str, Any] = field(default_factory=dict)
    created: float | None = None
    started: float | None = None
    finished: float | None = None
