"""The Optuna side of `learnbench tune`: one study per (problem, entry label, study index) in RUN_DIR/tuning.sqlite,
its sampler, and the objective a configuration is scored by. Only `learnbench.tune` imports this module (and so
Optuna).

* Samplers, all Optuna's: `qmc` (default) is `QMCSampler(qmc_type="sobol", scramble=True, seed=...)`, told the search
  space in advance (`_Sobol`): Optuna's class otherwise infers the space from the study's first trial, which it
  draws with its independent (random) sampler, so the first configuration of every study would not be a Sobol point.
  The Sobol index of each draw lives in the storage, so a resumed study continues the same sequence. `random` and
  `tpe` are built again before each ask with a seed derived from the study's seed and the trial's number, so a study
  that was killed and resumed draws what an uninterrupted one draws (a sampler object's generator would restart
  from its seed in the new process and repeat the first points). TPE starts from `min(10, max(2, n // 2))` random
  configurations (Optuna's 10 would leave nothing to model at the AlgoPerf budget of 5) and uses the constant liar,
  so a batch asked before any is told spreads out.
* Objectives: `val-accuracy` (maximise the final validation accuracy) or `time-to-target` (minimise the cost, in
  `flops`, `seconds` or `examples`, at the first evaluation whose validation accuracy reaches the target, AlgoPerf
  style). A configuration that failed or diverged scores the worst value (0 accuracy, or infinite cost), as does one
  that never reaches the target; it stays a failed trial of the study, which goes on.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from .search_space import Choice, Dimension, IntRange, LogUniform, suggest
from .trial import CurvePoint, StoredTrial

STORAGE_NAME = "tuning.sqlite"
SAMPLERS = ("qmc", "random", "tpe")
OBJECTIVES = ("val-accuracy", "time-to-target")
CURRENCIES = {"flops": "flops", "seconds": "train_seconds", "examples": "examples"}  # CLI name -> CurvePoint field

optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per trial: the progress bars say what runs


@dataclass(frozen=True)
class Objective:
    """What a configuration is scored by; only validation data is read."""

    name: str = "val-accuracy"
    target: float | None = None
    """time-to-target: the validation accuracy to reach, in [0, 1]."""
    currency: str | None = None
    """time-to-target: `flops`, `seconds` or `examples`."""

    @property
    def direction(self) -> str:
        return "maximize" if self.name == "val-accuracy" else "minimize"

    @property
    def worst(self) -> float:
        return 0.0 if self.name == "val-accuracy" else math.inf

    def config(self) -> dict[str, Any]:
        """As recorded in a tuned trial's `tuning`: how its configuration was chosen."""
        if self.name == "val-accuracy":
            return {"objective": self.name}
        return {"objective": self.name, "target": self.target, "currency": self.currency}

    def score(self, trial: StoredTrial, val_curve: Sequence[CurvePoint]) -> float:
        """The value told to the study: final validation accuracy, or the cost at the first validation evaluation
        that reaches the target; the worst value for a configuration that failed, diverged or never reached it."""
        if trial.status != "done":
            return self.worst
        if self.name == "val-accuracy":
            value = trial.metrics.get("val/accuracy")
            return float(value) if value is not None and math.isfinite(value) else self.worst
        field = CURRENCIES[self.currency or "flops"]
        hits = [getattr(p, field) for p in sorted(val_curve, key=lambda p: p.step)
                if p.metric == "val/accuracy" and p.value >= (self.target or 0.0)]
        return float(hits[0]) if hits else self.worst


def open_storage(run_dir: Path) -> optuna.storages.RDBStorage:
    """Optuna's SQLite storage beside the results store (created on first use)."""
    url = f"sqlite:///{(Path(run_dir) / STORAGE_NAME).resolve()}"
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})


def distributions(space: Mapping[str, Dimension]) -> dict[str, BaseDistribution]:
    """The Optuna distribution each dimension's `search_space.suggest` call asks for."""
    out: dict[str, BaseDistribution] = {}
    for name, dim in space.items():
        if isinstance(dim, Choice):
            out[name] = CategoricalDistribution(list(dim.options))
        elif isinstance(dim, IntRange):
            out[name] = IntDistribution(dim.low, dim.high, step=dim.step)
        else:
            out[name] = FloatDistribution(dim.low, dim.high, log=isinstance(dim, LogUniform))
    return out


def study_seed(*parts: Any) -> int:
    """A 32-bit seed from the parts that name a study (the suite and the study index)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "big")


class _Sobol(optuna.samplers.QMCSampler):
    """Optuna's scrambled-Sobol sampler over a search space given in advance (see the module docstring)."""

    def __init__(self, space: dict[str, BaseDistribution], seed: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # QMCSampler, stable since 3.0
            super().__init__(qmc_type="sobol", scramble=True, seed=seed)
        self._space = space

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        with warnings.catch_warnings():  # scipy: Sobol's balance properties want 2^m points; N is the user's
            warnings.filterwarnings("ignore", message=".*balance properties of Sobol.*")
            return super().sample_relative(study, trial, search_space)

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return dict(self._space)


def make_sampler(kind: str, space: dict[str, BaseDistribution], seed: int, number: int,
                 n_trials: int) -> optuna.samplers.BaseSampler:
    """The sampler that draws trial `number` of a study seeded `seed`."""
    if kind == "qmc":
        return _Sobol(space, seed)
    per_trial = study_seed(seed, number)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=per_trial)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constant_liar before Optuna 4
        return optuna.samplers.TPESampler(seed=per_trial, n_startup_trials=min(10, max(2, n_trials // 2)),
                                          constant_liar=True)


class Study:
    """One Optuna study of a tuning run: its first `n_trials` configurations (FAIL-state trials, whose
    configuration was never completely drawn because the process died while drawing it, do not count)."""

    def __init__(self, storage: optuna.storages.BaseStorage, name: str, space: Mapping[str, Dimension],
                 sampler: str, seed: int, objective: Objective, n_trials: int):
        self.space, self.kind, self.seed, self.n_trials = dict(space), sampler, seed, n_trials
        self.dists = distributions(space)
        self.study = optuna.create_study(storage=storage, study_name=name, direction=objective.direction,
                                         sampler=make_sampler(sampler, self.dists, seed, 0, n_trials),
                                         load_if_exists=True)
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if set(trial.params) != set(self.space):
                self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)

    def counted(self) -> list[FrozenTrial]:
        """The study's first `n_trials` drawn configurations, by number."""
        trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        return sorted(trials, key=lambda t: t.number)[:self.n_trials]

    def interrupted(self) -> list[tuple[int, dict[str, Any]]]:
        """(number, configuration) of the counted trials asked but never told: a killed run's, to rerun as they
        were drawn."""
        return [(t.number, dict(t.params)) for t in self.counted() if t.state == TrialState.RUNNING]

    def ask(self, k: int) -> list[tuple[int, dict[str, Any]]]:
        """Up to `k` new configurations, none beyond `n_trials`."""
        out = []
        for _ in range(max(0, min(k, self.n_trials - len(self.counted())))):
            number = len(self.study.get_trials(deepcopy=False))
            self.study.sampler = make_sampler(self.kind, self.dists, self.seed, number, self.n_trials)
            trial = self.study.ask()
            out.append((trial.number, suggest(trial, self.space)))
        return out

    def tell(self, number: int, value: float) -> None:
        self.study.tell(number, value, skip_if_finished=True)

    def told(self) -> list[FrozenTrial]:
        """The counted trials that have their value."""
        return [t for t in self.counted() if t.state == TrialState.COMPLETE]
